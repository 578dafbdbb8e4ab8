"""Neural ODE architectures: ODENet4, ODENet10 (thesis ch. 3.3) and a CNF (eq. 1.20, 2.20).

Every model stores its training `SolverConfig` as the JSON-serialisable ``solver`` builder
argument, so a checkpoint rebuilds with the solver it was trained with; evaluation with
another solver only reassigns ``block.config`` (see `set_solver`).

This module imports `odekit.ode`, which sits below `odekit.models` in the layering; it is
only imported lazily through the architecture registry's plugin list, never at package import.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from odekit.models.registry import register_arch
from odekit.ode import ODEBlock, SolverConfig, SolveStats

NORMS = ("bn", "ln", "wn", "sn", "none")
NORM_HELP = "bn: batch norm; ln: layer norm; wn: weight norm; sn: spectral norm; none"
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}
TRACE_MODES = ("auto", "exact", "hutchinson")
EXACT_TRACE_MAX_DIM = 8  # "auto": exact trace up to this dimension, Hutchinson above
DEFAULT_CLASSIFIER_SOLVER = {"solver": "rk2", "steps": 4}
DEFAULT_CNF_SOLVER = {"solver": "dopri5", "rtol": 1e-5, "atol": 1e-5}


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    key = value.strip().lower()
    if key not in choices:
        raise ValueError(f"unknown {what} '{value}' (choose from {', '.join(choices)})")
    return key


def _activation(name: str) -> nn.Module:
    return ACTIVATIONS[_check_choice(name, tuple(ACTIVATIONS), "activation")]()


def _config(solver: dict[str, Any] | SolverConfig | None, default: dict[str, Any]) -> SolverConfig:
    if isinstance(solver, SolverConfig):
        return solver
    return SolverConfig.from_dict(dict(solver) if solver is not None else default)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The feature-normalisation layer after a conv: BN, LN (over C,H,W) or nothing."""
    kind = _check_choice(kind, NORMS, "normalization")
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)  # one group = layer norm over (C, H, W), any image size
    return nn.Identity()


def reparametrize(conv: nn.Module, kind: str) -> nn.Module:
    """Weight (WN) or spectral (SN) normalisation act on the conv weights, not on features."""
    kind = _check_choice(kind, NORMS, "normalization")
    if kind == "wn":
        return parametrizations.weight_norm(conv)
    if kind == "sn":
        return parametrizations.spectral_norm(conv)
    return conv


class ConcatConv2d(nn.Module):
    """3x3 conv on [z, t] (time as an extra constant channel), so f depends on t."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv = reparametrize(nn.Conv2d(in_channels + 1, out_channels, 3, padding=1), norm)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0], 1, *z.shape[2:])
        return self.conv(torch.cat([z, tt], dim=1))


class ConvODEFunc(nn.Module):
    """f(t, z) = norm(conv(act(norm(conv([z, t]))))): two convs, each followed by `norm`."""

    def __init__(self, channels: int, norm: str = "ln", activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = ConcatConv2d(channels, channels, norm)
        self.norm1 = norm_layer(norm, channels)
        self.act = _activation(activation)
        self.conv2 = ConcatConv2d(channels, channels, norm)
        self.norm2 = norm_layer(norm, channels)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(t, z)))
        return self.norm2(self.conv2(t, out))


class MetaODEBlock(ODEBlock):
    """An `ODEBlock` that can also average several RK2(u) solves (solver ensembling, ch. 4.2).

    ``ensemble = [(u, weight), ...]`` makes forward return sum_i w_i z_{u_i}(t1); None is the
    plain block. ``call_stats`` holds the `SolveStats` of every solve of the latest call
    (their nfe_backward fill in when backward runs).
    """

    def __init__(self, func: nn.Module, config: SolverConfig) -> None:
        super().__init__(func, config)
        self.ensemble: list[tuple[float, float]] | None = None
        self.call_stats: list[SolveStats] = []

    def forward(self, z0: Tensor) -> Tensor:
        if not self.ensemble:
            out = super().forward(z0)
            self.call_stats = [self.last_stats]
            return out
        saved, stats = self.u_override, []
        total: Tensor | None = None
        try:
            for u, weight in self.ensemble:
                self.u_override = u
                out = super().forward(z0) * weight
                total = out if total is None else total + out
                stats.append(self.last_stats)
        finally:
            self.u_override = saved
        self.call_stats = stats
        assert total is not None
        return total


def _stem(in_channels: int, width: int, stride: int, norm: str, activation: str) -> nn.Sequential:
    conv = reparametrize(nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=norm != "bn"), norm)
    return nn.Sequential(conv, norm_layer(norm, width), _activation(activation))


class ODENet4(nn.Module):
    """conv -> norm -> act -> ODE block -> avgpool -> fc (thesis ch. 3.3)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        norm_first: str = "bn",
        norm_ode: str = "ln",
        activation: str = "relu",
        stem_stride: int = 1,
        pool: int = 1,
        solver: dict[str, Any] | SolverConfig | None = None,
    ) -> None:
        super().__init__()
        if width < 1 or stem_stride < 1 or pool < 1:
            raise ValueError(f"width, stem_stride and pool must be >= 1, got {width}, {stem_stride}, {pool}")
        self.stem = _stem(in_channels, width, stem_stride, norm_first, activation)
        self.ode = MetaODEBlock(ConvODEFunc(width, norm_ode, activation), _config(solver, DEFAULT_CLASSIFIER_SOLVER))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(width * pool * pool, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ode(self.stem(x)))


class ResBlock(nn.Module):
    """Pre-activation-free basic ResNet block (conv-norm-act-conv-norm + shortcut, act)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, activation: str) -> None:
        super().__init__()
        bias = norm != "bn"
        self.conv1 = reparametrize(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias), norm)
        self.norm1 = norm_layer(norm, out_channels)
        self.conv2 = reparametrize(nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias), norm)
        self.norm2 = norm_layer(norm, out_channels)
        self.act = _activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                reparametrize(nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias), norm),
                norm_layer(norm, out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(out)) + self.shortcut(x))


class ODENet10(nn.Module):
    """conv -> norm -> act -> ResNet block -> ODE block -> ResNet block (stride 2, 2x width)
    -> ODE block -> avgpool -> fc (thesis ch. 3.3); ResNet blocks use ``norm_first``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        norm_first: str = "bn",
        norm_ode: str = "ln",
        activation: str = "relu",
        stem_stride: int = 1,
        pool: int = 1,
        solver: dict[str, Any] | SolverConfig | None = None,
    ) -> None:
        super().__init__()
        if width < 1 or stem_stride < 1 or pool < 1:
            raise ValueError(f"width, stem_stride and pool must be >= 1, got {width}, {stem_stride}, {pool}")
        config = _config(solver, DEFAULT_CLASSIFIER_SOLVER)
        self.stem = _stem(in_channels, width, stem_stride, norm_first, activation)
        self.res1 = ResBlock(width, width, 1, norm_first, activation)
        self.ode1 = MetaODEBlock(ConvODEFunc(width, norm_ode, activation), config)
        self.res2 = ResBlock(width, 2 * width, 2, norm_first, activation)
        self.ode2 = MetaODEBlock(ConvODEFunc(2 * width, norm_ode, activation), config)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(2 * width * pool * pool, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.ode1(self.res1(self.stem(x)))
        return self.head(self.ode2(self.res2(out)))


class ConcatSquashLinear(nn.Module):
    """(W z + b1) * sigmoid(t c + b2) + t b3 (thesis eq. 2.20)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)
        self.hyper_gate = nn.Linear(1, out_features)  # t c + b2
        self.hyper_bias = nn.Linear(1, out_features, bias=False)  # t b3

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(1, 1)
        return self.layer(z) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class CNFDynamics(nn.Module):
    """Augmented CNF dynamics on the packed state [z, delta]: d/dt [z, delta] = [f, -tr(df/dz)].

    The trace is exact (one vector-Jacobian product per dimension) or Hutchinson's estimate
    e^T (df/dz) e with Rademacher noise ``e`` that stays fixed for a whole solve (set by
    `CNF.log_prob`), so forward and backward solves see the same dynamics.
    """

    def __init__(self, dim: int, hidden: Sequence[int], activation: str, trace: str) -> None:
        super().__init__()
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in itertools.pairwise(widths))
        self.act = _activation(activation)
        self.dim = dim
        mode = _check_choice(trace, TRACE_MODES, "trace mode")
        self.exact = mode == "exact" or (mode == "auto" and dim <= EXACT_TRACE_MAX_DIM)
        self.noise: Tensor | None = None

    def velocity(self, t: Tensor, z: Tensor) -> Tensor:
        out = z
        for i, layer in enumerate(self.layers):
            out = layer(t, out)
            if i < len(self.layers) - 1:
                out = self.act(out)
        return out

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        # The trace is itself a derivative: it needs a graph even when the caller has none,
        # and a differentiable one (create_graph) whenever the caller is differentiating.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = state[:, : self.dim]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.velocity(t, z)
            if self.exact:
                trace = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
                for i in range(self.dim):
                    (row,) = torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
                    trace = trace + row[:, i]
            else:
                if self.noise is None or self.noise.shape != z.shape:
                    raise RuntimeError("Hutchinson noise was not set for this batch; call CNF.log_prob")
                (vjp,) = torch.autograd.grad(dz, z, self.noise, create_graph=create_graph)
                trace = (vjp * self.noise).sum(dim=1)
        if not create_graph:
            dz, trace = dz.detach(), trace.detach()
        return torch.cat([dz, -trace[:, None]], dim=1)


class CNF(nn.Module):
    """Continuous normalizing flow: data x at t=0 flows to a standard normal at t=t1.

    ``forward(x)`` returns log p(x) per sample (nats): log N(z(t1)) + integral of tr(df/dz).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        trace: str = "auto",
        solver: dict[str, Any] | SolverConfig | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"dim and hidden widths must be >= 1, got {dim}, {list(hidden)}")
        self.dim = dim
        self.dynamics = CNFDynamics(dim, hidden, activation, trace)
        self.ode = MetaODEBlock(self.dynamics, _config(solver, DEFAULT_CNF_SOLVER))

    def _set_noise(self, shape: torch.Size, like: Tensor) -> None:
        if not self.dynamics.exact:
            self.dynamics.noise = torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1

    def log_prob(self, x: Tensor) -> Tensor:
        self._set_noise(x.shape, x)
        state = torch.cat([x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        out = self.ode(state)
        z1, delta = out[:, : self.dim], out[:, self.dim]
        log_pz = -0.5 * (z1**2).sum(dim=1) - 0.5 * self.dim * math.log(2 * math.pi)
        return log_pz - delta

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples: base noise integrated from t1 back to 0 with the block's solver."""
        from odekit.ode import odeint

        param = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator).to(param)
        self._set_noise(z.shape, z)
        state = torch.cat([z, torch.zeros(n, 1, dtype=z.dtype, device=z.device)], dim=1)
        cfg = self.ode.config
        sol = odeint(
            self.dynamics, state, torch.tensor([cfg.t1, 0.0], dtype=torch.float64), solver=cfg.solver,
            steps=cfg.steps, u=cfg.u, rtol=cfg.rtol, atol=cfg.atol,
        )
        return sol.z[-1][:, : self.dim]


@register_arch("odenet4", "ODENet4: conv-norm-act, ODE block, avgpool, fc (thesis ch. 3)", (3, 32, 32), "ode")
def odenet4(**kwargs: Any) -> ODENet4:
    return ODENet4(**kwargs)


@register_arch("odenet10", "ODENet10: ResNet blocks between two ODE blocks (thesis ch. 3)", (3, 32, 32), "ode")
def odenet10(**kwargs: Any) -> ODENet10:
    return ODENet10(**kwargs)


@register_arch("cnf", "continuous normalizing flow with concatsquash layers (thesis eq. 1.20, 2.20)", (2,), "ode")
def cnf(**kwargs: Any) -> CNF:
    return CNF(**kwargs)


def ode_blocks(model: nn.Module) -> list[ODEBlock]:
    """The ODE blocks of ``model`` in module order (empty for a non-ODE model)."""
    return [m for m in model.modules() if isinstance(m, ODEBlock)]


def set_solver(model: nn.Module, config: SolverConfig) -> None:
    """Integrate every ODE block of ``model`` with ``config`` from now on."""
    for block in ode_blocks(model):
        block.config = config


def set_u(model: nn.Module, u: float | None, ensemble: list[tuple[float, float]] | None = None) -> None:
    """Meta-solver hook: RK2's u for the next calls (None: the config's), or an ensemble."""
    for block in ode_blocks(model):
        block.u_override = u
        if isinstance(block, MetaODEBlock):
            block.ensemble = ensemble


def nfe_counts(model: nn.Module) -> tuple[int, int]:
    """(forward, backward) f evaluations of the latest call, summed over blocks and solves."""
    forward = backward = 0
    for block in ode_blocks(model):
        stats = block.call_stats if isinstance(block, MetaODEBlock) else [block.last_stats]
        forward += sum(s.nfe_forward for s in stats)
        backward += sum(s.nfe_backward for s in stats)
    return forward, backward


def uses_hutchinson(model: nn.Module) -> bool:
    return isinstance(model, CNF) and not model.dynamics.exact


