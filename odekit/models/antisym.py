"""The separable antisymmetric ODE network of "Train Like a (Var)Pro" (Newman et al., 2020).

u(0) = sigma(K_in y + b_in), du/dt = sigma((K(t) - K(t)^T - gamma I) u + b(t)) on [0, T],
x = W u(T). K(t), b(t) live on the d + 1 nodes of an equidistant grid of [0, T] (d cells,
"depth") and are linear in t between nodes, so refining the grid by interpolation leaves
K(t), b(t) -- and the network's output for a fixed integration grid -- unchanged. The ODE
block integrates with RK4 on ``steps`` equal steps (default: d), through `odekit.ode`.

The last layer is an ``nn.Linear``: the network is separable in W (see odekit.methods.varpro).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from odekit.models.ode_models import ACTIVATIONS, MetaODEBlock, _activation, _check_choice
from odekit.models.registry import register_arch
from odekit.ode import SolverConfig

DEFAULT_GAMMA = 1e-4


class AntisymODEFunc(nn.Module):
    """f(t, u) = sigma((K(t) - K(t)^T - gamma I) u + b(t)), K and b piecewise linear in t."""

    def __init__(self, width: int, depth: int, t1: float, gamma: float, activation: str) -> None:
        super().__init__()
        self.width, self.depth, self.t1, self.gamma = width, depth, float(t1), float(gamma)
        self.act = _activation(activation)
        self.K = nn.Parameter(torch.randn(depth + 1, width, width) / math.sqrt(width))
        self.b = nn.Parameter(torch.zeros(depth + 1, width))

    def _node_weights(self, t: Tensor | float) -> tuple[int, float]:
        s = min(max(float(t) / self.t1, 0.0), 1.0) * self.depth
        k = min(math.floor(s), self.depth - 1)
        return k, s - k

    def operator(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(K(t) - K(t)^T - gamma I, b(t)) at time t."""
        k, w = self._node_weights(t)
        K = (1.0 - w) * self.K[k] + w * self.K[k + 1]
        b = (1.0 - w) * self.b[k] + w * self.b[k + 1]
        eye = torch.eye(self.width, dtype=K.dtype, device=K.device)
        return K - K.T - self.gamma * eye, b

    def forward(self, t: Tensor, u: Tensor) -> Tensor:
        A, b = self.operator(t)
        return self.act(u @ A.T + b)


class ODENetAntisym(nn.Module):
    """Flatten -> sigma(K_in y + b_in) -> antisymmetric ODE block (RK4) -> Linear head."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int = 16,
        depth: int = 8,
        t1: float = 1.0,
        gamma: float = DEFAULT_GAMMA,
        activation: str = "tanh",
        solver: dict[str, Any] | SolverConfig | None = None,
    ) -> None:
        super().__init__()
        if min(in_features, out_features, width, depth) < 1:
            raise ValueError(f"in/out features, width and depth must be >= 1, got {in_features}, {out_features}, {width}, {depth}")
        if not (t1 > 0 and gamma >= 0):
            raise ValueError(f"t1 must be > 0 and gamma >= 0, got {t1}, {gamma}")
        _check_choice(activation, tuple(ACTIVATIONS), "activation")
        if isinstance(solver, SolverConfig):
            config = solver
        else:
            config = SolverConfig.from_dict(dict(solver) if solver else {"solver": "rk4", "steps": depth, "t1": t1})
        if abs(config.t1 - t1) > 1e-12:
            raise ValueError(f"the solver's t1 ({config.t1}) differs from the network's t1 ({t1})")
        self.depth = depth
        self.flatten = nn.Flatten()
        self.opening = nn.Linear(in_features, width)
        self.act = _activation(activation)
        self.ode = MetaODEBlock(AntisymODEFunc(width, depth, t1, gamma, activation), config)
        self.head = nn.Linear(width, out_features)

    def forward(self, y: Tensor) -> Tensor:
        return self.head(self.ode(self.act(self.opening(self.flatten(y)))))


def antisym_args(model: ODENetAntisym) -> dict[str, Any]:
    """The builder arguments that rebuild ``model`` (for checkpoint metadata)."""
    func = model.ode.func
    assert isinstance(func, AntisymODEFunc)
    act = next(name for name, cls in ACTIVATIONS.items() if isinstance(func.act, cls))
    return {
        "in_features": model.opening.in_features,
        "out_features": model.head.out_features,
        "width": func.width,
        "depth": func.depth,
        "t1": func.t1,
        "gamma": func.gamma,
        "activation": act,
        "solver": model.ode.config.to_dict(),
    }


@torch.no_grad()
def prolongate(model: ODENetAntisym, refine_steps: bool = False) -> ODENetAntisym:
    """The same network on a grid of 2d cells: K(t), b(t) interpolated linearly in t.

    Every other new node is an old node and the rest are midpoints, so the piecewise-linear
    K(t), b(t) are unchanged: with ``refine_steps=False`` (same RK4 grid) the output is
    unchanged up to round-off. ``refine_steps=True`` also doubles the RK4 steps, which changes
    the output by the RK4 discretisation difference, O(h^4).
    """
    args = antisym_args(model)
    func = model.ode.func
    assert isinstance(func, AntisymODEFunc)
    config = model.ode.config
    steps = config.steps if config.steps is not None else func.depth
    args["depth"] = 2 * func.depth
    args["solver"] = config.replace(steps=2 * steps if refine_steps else steps).to_dict()
    fine = ODENetAntisym(**args).to(dtype=func.K.dtype, device=func.K.device)
    fine.opening.load_state_dict(model.opening.state_dict())
    fine.head.load_state_dict(model.head.state_dict())
    fine_func = fine.ode.func
    assert isinstance(fine_func, AntisymODEFunc)
    for name in ("K", "b"):
        coarse = getattr(func, name)
        target = getattr(fine_func, name)
        target[0::2] = coarse
        target[1::2] = 0.5 * (coarse[:-1] + coarse[1:])
    return fine


@register_arch("odenet_antisym", "antisymmetric ODE network (VarPro slides): MLP input, RK4 block, linear head", None, "ode")
def odenet_antisym(**kwargs: Any) -> ODENetAntisym:
    return ODENetAntisym(**kwargs)
