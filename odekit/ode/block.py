"""`SolverConfig` (validated, JSON-serialisable solver settings) and the `ODEBlock` layer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from odekit.errors import UsageError
from odekit.ode.gradients import GRADIENT_METHODS
from odekit.ode.odeint import check_cheb_nodes, odeint
from odekit.ode.solver import SolveStats
from odekit.ode.tableau import SOLVERS


@dataclass(frozen=True)
class SolverConfig:
    """How an ODE block is integrated and differentiated; stored in checkpoint metadata."""

    solver: str = "dopri5"
    steps: int | None = None
    u: float = 0.5
    rtol: float = 1e-3
    atol: float = 1e-4
    grad: str = "backprop"
    cheb_nodes: int | str = "auto"
    checkpoints: int = 1
    seminorm: bool = False
    t1: float = 1.0
    adjoint_rtol: float | None = None  # rdm/irdm backward solves; None: rtol
    adjoint_atol: float | None = None

    def __post_init__(self) -> None:
        for name in ("u", "rtol", "atol", "t1", "checkpoints", "steps",
                     "adjoint_rtol", "adjoint_atol"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):
                raise UsageError(f"solver config '{name}' must be a number, got {value!r}")
        spec = SOLVERS.get(self.solver)  # UsageError listing names
        GRADIENT_METHODS.get(self.grad)
        object.__setattr__(self, "solver", spec.name)
        object.__setattr__(self, "grad", self.grad.strip().lower())
        if spec.adaptive:
            if self.steps is not None:
                raise UsageError(f"solver '{spec.name}' is adaptive and takes no steps")
        elif self.steps is None or isinstance(self.steps, bool) or int(self.steps) != self.steps \
                or self.steps < 1:
            raise UsageError(f"fixed-step solver '{spec.name}' needs steps >= 1, got {self.steps}")
        if not 0.0 < float(self.u) <= 1.0:
            raise UsageError(f"rk2 parameter u must lie in (0, 1], got {self.u}")
        if not (self.rtol > 0 and self.atol > 0):
            raise UsageError(f"rtol and atol must be positive, got {self.rtol}, {self.atol}")
        for name in ("adjoint_rtol", "adjoint_atol"):
            value = getattr(self, name)
            if value is not None:
                if not value > 0:
                    raise UsageError(f"{name} must be positive, got {value}")
                object.__setattr__(self, name, float(value))
        object.__setattr__(self, "cheb_nodes", check_cheb_nodes(self.cheb_nodes))
        if int(self.checkpoints) != self.checkpoints or self.checkpoints < 1:
            raise UsageError(f"checkpoints must be an integer >= 1, got {self.checkpoints}")
        if not (math.isfinite(self.t1) and self.t1 > 0):
            raise UsageError(f"t1 must be a positive finite number, got {self.t1}")
        # Canonical types, so configs read back from JSON compare equal.
        for name in ("u", "rtol", "atol", "t1"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "checkpoints", int(self.checkpoints))
        if self.steps is not None:
            object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "seminorm", bool(self.seminorm))

    @property
    def adaptive(self) -> bool:
        return SOLVERS.get(self.solver).adaptive

    def nfe_per_solve(self) -> int | None:
        """f evaluations of one forward solve (stages x steps); None for adaptive solvers."""
        spec = SOLVERS.get(self.solver)
        return None if spec.adaptive else spec.stages * int(self.steps or 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SolverConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown solver config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> SolverConfig:
        return SolverConfig(**{**self.to_dict(), **changes})


class ODEBlock(nn.Module):
    """z0 -> z(t1) for dz/dt = func(t, z) on [0, config.t1].

    `config` may be reassigned (evaluate with another solver); `u_override` (float or 0-d
    tensor) replaces config.u for RK2 without rebuilding anything; `last_stats` holds the
    counts of the latest call (its nfe_backward fills in after backward).
    """

    def __init__(self, func: nn.Module, config: SolverConfig) -> None:
        super().__init__()
        self.func = func
        self.config = config
        self.u_override: float | Tensor | None = None
        self.last_stats = SolveStats()

    def forward(self, z0: Tensor) -> Tensor:
        cfg = self.config
        u = cfg.u if self.u_override is None else self.u_override
        t = torch.tensor([0.0, cfg.t1], dtype=torch.float64)
        sol = odeint(
            self.func, z0, t, solver=cfg.solver, grad=cfg.grad, steps=cfg.steps, u=u,
            rtol=cfg.rtol, atol=cfg.atol, cheb_nodes=cfg.cheb_nodes,
            checkpoints=cfg.checkpoints, seminorm=cfg.seminorm,
            adjoint_rtol=cfg.adjoint_rtol, adjoint_atol=cfg.adjoint_atol,
        )
        self.last_stats = sol.stats
        return sol.z[-1]

    def extra_repr(self) -> str:
        c = self.config
        detail = f"steps={c.steps}" if not c.adaptive else f"rtol={c.rtol:g}, atol={c.atol:g}"
        if c.adaptive and (c.adjoint_rtol is not None or c.adjoint_atol is not None):
            detail += f", adjoint_rtol={c.adjoint_rtol or c.rtol:g}, adjoint_atol={c.adjoint_atol or c.atol:g}"
        return f"solver={c.solver}, {detail}, grad={c.grad}, t1={c.t1:g}"
