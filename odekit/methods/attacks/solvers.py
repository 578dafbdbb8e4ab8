"""Grey-box attacks on ODE models (thesis table 4.3): attack with one solver, evaluate with another.

A solver spec is ``SOLVER[:STEPS[:U]]``: ``euler:2``, ``rk2:8`` (u = 0.5), ``rk2:4:1.0`` (Heun),
``rk4:4``, ``dopri5`` (adaptive, no steps). It replaces solver, steps and u in the `config` of
every `odekit.ode.ODEBlock` of a model; other settings (gradient method, t1, tolerances) stay.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import nn

from odekit.errors import UnsupportedModelError, UsageError
from odekit.ode import SOLVERS, ODEBlock

# fixed steps per ODE block an attack may ask for: the gradient keeps every step's states, so
# memory grows with steps x batch; 10,000 is the adaptive solvers' own step limit
MAX_SOLVER_STEPS = 10_000


@dataclass(frozen=True)
class SolverSpec:
    solver: str
    steps: int | None
    u: float | None

    def __str__(self) -> str:
        text = self.solver + (f":{self.steps}" if self.steps is not None else "")
        return text + (f":{self.u:g}" if self.u is not None else "")


def parse_solver_spec(text: str) -> SolverSpec:
    """'rk2:8' -> SolverSpec('rk2', 8, None); validation of the values by `SolverConfig`."""
    parts = [p.strip() for p in text.strip().split(":")]
    hint = f"write SOLVER[:STEPS[:U]], e.g. rk2:8 or euler:2 or dopri5; solvers: {', '.join(SOLVERS.names())}"
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"cannot read solver spec '{text}'", hint)
    spec = SOLVERS.get(parts[0])
    try:
        steps = int(parts[1]) if len(parts) > 1 and parts[1] else None
        u = float(parts[2]) if len(parts) > 2 else None
    except ValueError as exc:
        raise UsageError(f"cannot read solver spec '{text}'", hint) from exc
    if not spec.adaptive and steps is None:
        raise UsageError(
            f"fixed-step solver '{spec.name}' needs a number of steps in '{text}'", hint
        )
    if steps is not None and not 1 <= steps <= MAX_SOLVER_STEPS:
        raise UsageError(
            f"solver steps must lie in [1, {MAX_SOLVER_STEPS}], got {steps} in '{text}'",
            "memory for the gradient grows with the step count; a few to a few hundred "
            "steps are typical",
        )
    if u is not None and not math.isfinite(u):
        raise UsageError(f"the solver parameter u must be finite, got {u} in '{text}'", hint)
    return SolverSpec(spec.name, steps, u)


def ode_blocks(model: nn.Module) -> list[ODEBlock]:
    return [m for m in model.modules() if isinstance(m, ODEBlock)]


def with_solver(
    model: nn.Module, spec: SolverSpec | None, role: str = "`attack_solver`"
) -> nn.Module:
    """A copy of ``model`` whose ODE blocks integrate with ``spec`` (``model`` itself for None)."""
    if spec is None:
        return model
    if not ode_blocks(model):
        raise UnsupportedModelError(
            f"{role} {spec} was given but the model has no ODE blocks",
            "solver options apply to neural ODE models (odekit train-ode checkpoints) only",
        )
    out = copy.deepcopy(model)
    for block in ode_blocks(out):
        changes: dict[str, object] = {"solver": spec.solver, "steps": spec.steps}
        if spec.u is not None:
            changes["u"] = spec.u
        block.config = block.config.replace(**changes)
    return out.eval()
