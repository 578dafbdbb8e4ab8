"""`odeint`: solve dz/dt = f(t, z) and return z at the output times plus exact f counts."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from odekit.errors import NumericalError, UsageError
from odekit.ode.gradients import GRADIENT_METHODS, Problem, forward_solve
from odekit.ode.solver import SolveStats, StepControl
from odekit.ode.tableau import SOLVERS, step_coefficients

DEFAULT_MAX_STEPS = 10_000


@dataclass
class ODESolution:
    """z: (len(t), *z0.shape); stats.nfe_backward is filled in when backward runs."""

    z: Tensor
    t: Tensor
    stats: SolveStats

    @property
    def final(self) -> Tensor:
        return self.z[-1]


def _times(t: Tensor | Sequence[float]) -> list[float]:
    tt = torch.as_tensor(t)
    if tt.ndim != 1 or tt.numel() < 2:
        raise UsageError(f"t must be a 1-D tensor of at least 2 times, got shape {tuple(tt.shape)}")
    times = [float(x) for x in tt.detach().cpu().tolist()]  # one host read, before any step
    if not all(math.isfinite(x) for x in times):
        raise UsageError("output times must be finite")
    diffs = [b - a for a, b in itertools.pairwise(times)]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise UsageError("output times must be strictly increasing (or strictly decreasing)")
    return times


def check_cheb_nodes(value: object) -> int | str:
    """'auto' (any case) or an integer N >= 2, as the canonical value; UsageError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value \
            or value < 2:
        raise UsageError(f"cheb_nodes must be 'auto' or an integer >= 2, got {value!r}",
                         "'auto' chooses the interpolant from the forward solve")
    return int(value)


def odeint(
    f: Callable[[Tensor, Tensor], Tensor],
    z0: Tensor,
    t: Tensor | Sequence[float],
    *,
    solver: str = "dopri5",
    grad: str = "backprop",
    steps: int | None = None,
    u: float | Tensor = 0.5,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    cheb_nodes: int | str = "auto",
    checkpoints: int = 1,
    seminorm: bool = False,
    max_steps: int = DEFAULT_MAX_STEPS,
    params: Sequence[Tensor] | None = None,
    safety: float = 0.9,
    min_step: float = 0.0,
    max_step: float = math.inf,
    first_step: float | None = None,
) -> ODESolution:
    """Solve dz/dt = f(t, z), z(t[0]) = z0, and return z at every time in `t`.

    `solver`: a name in `SOLVERS` (fixed-step ones need `steps`, the number of equal steps
    over [t[0], t[-1]]; `u` is RK2's parameter, a float or 0-d tensor). `grad`: a name in
    `GRADIENT_METHODS`; gradients reach z0 and `params` (default: the trainable parameters of
    f when it is an nn.Module). `rtol`/`atol`/`safety`/`min_step`/`max_step`/`first_step`/
    `max_steps` control dopri5; `adjoint_rtol`/`adjoint_atol` (default: rtol/atol) control
    the backward solves of rdm and irdm; `cheb_nodes` is for irdm: "auto" (a piecewise
    Chebyshev interpolant of the accepted steps, its estimated error within the adjoint
    tolerance) or a fixed N (one interpolant on N+1 points; an `InterpolationWarning` says
    when it misses the tolerance); `checkpoints` is for anode, `seminorm` drops dL/dtheta
    from the backward step control of rdm and irdm.
    """
    spec = SOLVERS.get(solver)
    method = GRADIENT_METHODS.get(grad)
    if not isinstance(z0, Tensor) or not z0.is_floating_point():
        raise UsageError("z0 must be a floating-point tensor")
    times = _times(t)
    if spec.adaptive:
        if steps is not None:
            raise UsageError(f"solver '{spec.name}' is adaptive and takes no 'steps'",
                             "set rtol/atol instead, or pick euler/rk2/rk4")
        if not (rtol > 0 and atol > 0):
            raise UsageError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
        for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
            if value is not None and not value > 0:
                raise UsageError(f"{name} must be positive, got {value}")
    else:
        if steps is None:
            raise UsageError(f"fixed-step solver '{spec.name}' needs 'steps'",
                             "give the number of steps over [t0, t1], e.g. steps=10")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise UsageError(f"steps must be a positive integer, got {steps}")
        steps = int(steps)
    cheb_nodes = check_cheb_nodes(cheb_nodes)
    if int(checkpoints) != checkpoints or checkpoints < 1:
        raise UsageError(f"checkpoints must be an integer >= 1, got {checkpoints}")
    if int(max_steps) != max_steps or max_steps < 1:
        raise UsageError(f"max_steps must be a positive integer, got {max_steps}")

    if isinstance(u, Tensor):
        u = u.detach().to(dtype=z0.dtype, device=z0.device)
    co = step_coefficients(spec.name, u)
    co_back = co if not isinstance(u, Tensor) else step_coefficients(spec.name, float(u))
    if params is None:
        params = [p for p in f.parameters() if p.requires_grad] if isinstance(f, nn.Module) else []
    params = tuple(params)
    stats = SolveStats()
    control = StepControl(rtol=float(rtol), atol=float(atol), safety=float(safety),
                          min_step=float(min_step), max_step=float(max_step),
                          max_steps=int(max_steps), first_step=first_step)
    control_back = control
    if adjoint_rtol is not None or adjoint_atol is not None:
        # The forward first step says nothing about the adjoint's scale: pick it afresh.
        control_back = dataclasses.replace(
            control, first_step=None,
            rtol=float(rtol if adjoint_rtol is None else adjoint_rtol),
            atol=float(atol if adjoint_atol is None else adjoint_atol),
        )
    prob = Problem(
        f=f, params=params, times=times, co=co, co_back=co_back,
        steps=None if spec.adaptive else steps,
        control=control if spec.adaptive else None,
        control_back=control_back if spec.adaptive else None,
        stats=stats, cheb_nodes=cheb_nodes, checkpoints=int(checkpoints),
        seminorm=bool(seminorm),
    )
    needs_grad = torch.is_grad_enabled() and (
        z0.requires_grad or any(p.requires_grad for p in params)
    )
    if needs_grad:
        z = method(prob, z0)
    else:
        with torch.no_grad():
            outs, _, _ = forward_solve(prob, z0)
            z = torch.stack([z0, *outs])
    if not spec.adaptive and not bool(torch.isfinite(z[-1]).all()):
        # Adaptive solves reject non-finite steps; fixed-step ones are checked once here.
        raise NumericalError(f"the {spec.name} solution is not finite",
                             "use more steps or a smaller learning rate")
    t_out = torch.tensor(times, dtype=z0.dtype, device=z0.device)
    return ODESolution(z=z, t=t_out, stats=stats)
