"""Gradient methods through an ODE solve: backprop, rdm (adjoint), anode, irdm.

Each method maps a `Problem` and z0 to the stacked solution z(t_i), differentiable w.r.t. z0
and the parameters. Non-backprop methods are `torch.autograd.Function`s whose backward adds
its exact f-evaluation count to `problem.stats.nfe_backward`. Parameter gradients keep each
parameter's own shape.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from odekit.ode.interp import (
    AdaptiveChebyshevBuilder,
    InterpolationWarning,
    PiecewiseChebyshev,
    fixed_estimate,
    fixed_grid,
)
from odekit.ode.solver import OnStep, SolveStats, StepControl, integrate
from odekit.ode.tableau import StepCoefficients
from odekit.registry import Registry


@dataclass
class Problem:
    """Everything a gradient method needs besides z0 (built and validated by `odeint`)."""

    f: Callable[[Tensor, Tensor], Tensor]
    params: tuple[Tensor, ...]
    times: list[float]  # output times, times[0] = start
    co: StepCoefficients  # forward coefficients (may hold a tensor u)
    co_back: StepCoefficients  # float coefficients for backward solves
    steps: int | None  # fixed steps over [times[0], times[-1]], None = adaptive
    control: StepControl | None
    control_back: StepControl | None  # backward (adjoint) solves of rdm and irdm
    stats: SolveStats = field(default_factory=SolveStats)
    cheb_nodes: int | str = "auto"  # irdm: "auto" (piecewise, error-controlled) or a fixed N
    checkpoints: int = 1
    seminorm: bool = False

    def time_tensor(self, t: float | Tensor, like: Tensor) -> Tensor:
        if isinstance(t, Tensor):
            return t
        return torch.full((), t, dtype=like.dtype, device=like.device)

    def interval_steps(self, ta: float, tb: float) -> int | None:
        """Fixed steps for a sub-interval, proportional to its length (backward solves)."""
        if self.steps is None:
            return None
        total = abs(self.times[-1] - self.times[0])
        return max(1, round(self.steps * abs(tb - ta) / total))


def forward_solve(prob: Problem, z0: Tensor, extra_times: list[float] | None = None,
                  record_steps: bool = False, on_accept=None, on_step: OnStep | None = None):
    """One forward solve; returns (z at times[1:], z at extra_times, SolveResult)."""
    f = prob.f

    def dyn(t, y):
        return [f(prob.time_tensor(t, z0), y[0])]

    t0, t_end = prob.times[0], prob.times[-1]
    user = prob.times[1:]
    extra = list(extra_times or [])
    direction = 1.0 if t_end > t0 else -1.0
    tagged = sorted([(direction * x, 0, i) for i, x in enumerate(user)]
                    + [(direction * x, 1, i) for i, x in enumerate(extra)])
    res = integrate(
        dyn, [z0], t0, t_end, prob.co,
        fixed_steps=prob.steps, control=None if prob.steps else prob.control,
        out_times=[direction * s for s, _, _ in tagged],
        record_steps=record_steps, on_accept=on_accept, on_step=on_step,
    )
    outs: list[Tensor | None] = [None] * len(user)
    ext: list[Tensor | None] = [None] * len(extra)
    for (_, tag, i), val in zip(tagged, res.outputs, strict=True):
        (outs if tag == 0 else ext)[i] = val
    prob.stats.nfe_forward += res.nfe
    prob.stats.accepted_steps += res.accepted
    prob.stats.rejected_steps += res.rejected
    return outs, ext, res


def _vjp(f, t: Tensor, z: Tensor, a: Tensor, params: tuple[Tensor, ...]):
    """f(t, z) and a^T [df/dz, df/dtheta] (zeros for parameters f does not use)."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        fz = f(t, zr)
        grads = torch.autograd.grad(fz, (zr, *params), a, allow_unused=True)
    out = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, (zr, *params), strict=True)]
    return fz.detach(), out


def _neg(xs: list[Tensor]) -> list[Tensor]:
    return list(torch._foreach_neg(xs))


def _cotangent_scale(gz: Tensor) -> Tensor:
    """RMS of the incoming cotangent (1 if it is zero), as a 0-d tensor (no host sync).

    The adjoint equations are linear in (a, dL/dtheta), so they are solved for gz / scale and
    the result is scaled back: atol then means the same thing whatever the scale of the loss
    (a mean over a large batch makes a = dL/dz tiny, and an absolute tolerance of 1e-5 on
    values of 1e-6 controls nothing).
    """
    rms = gz.detach().square().mean().sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms))


# ---------------------------------------------------------------- backprop


def run_backprop(prob: Problem, z0: Tensor) -> Tensor:
    outs, _, _ = forward_solve(prob, z0)
    return torch.stack([z0, *outs])


# ---------------------------------------------------------------- rdm (adjoint)


class _RDM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Problem, z0: Tensor, *params: Tensor) -> Tensor:
        outs, _, _ = forward_solve(prob, z0)
        zs = torch.stack([z0, *outs])
        ctx.prob = prob
        ctx.save_for_backward(zs)
        return zs

    @staticmethod
    @once_differentiable
    def backward(ctx, gz: Tensor):
        prob: Problem = ctx.prob
        (zs,) = ctx.saved_tensors
        params, times, f = prob.params, prob.times, prob.f
        n_norm = 2 if prob.seminorm else 2 + len(params)

        def dyn(t, y):
            fz, vj = _vjp(f, prob.time_tensor(t, zs), y[0], y[1], params)
            return [fz, *_neg(vj)]

        scale = _cotangent_scale(gz)
        gz = gz / scale
        a = gz[-1]
        gp = [torch.zeros_like(p) for p in params]
        for i in range(len(times) - 1, 0, -1):
            # z is reset to the stored forward value at every output time.
            res = integrate(
                dyn, [zs[i], a, *gp], times[i], times[i - 1], prob.co_back, n_active=2,
                fixed_steps=prob.interval_steps(times[i], times[i - 1]),
                control=prob.control_back, n_norm=n_norm, n_solo=2,
            )
            prob.stats.nfe_backward += res.nfe
            a = res.y[1] + gz[i - 1]
            gp = res.y[2:]
        return (None, a * scale, *[g * scale for g in gp])


def run_rdm(prob: Problem, z0: Tensor) -> Tensor:
    return _RDM.apply(prob, z0, *prob.params)


# ---------------------------------------------------------------- anode (checkpointing)


class _ANODE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Problem, z0: Tensor, *params: Tensor) -> Tensor:
        t0, t_end = prob.times[0], prob.times[-1]
        k = prob.checkpoints
        targets = [t0 + (t_end - t0) * j / k for j in range(1, k)]
        direction = 1.0 if t_end > t0 else -1.0
        ckpts: list[tuple[int, float, Tensor]] = [(0, t0, z0)]
        n_steps = [0]

        def on_accept(t_new: float, y_new: list[Tensor]) -> None:
            n_steps[0] += 1
            if targets and t_new != t_end and direction * (t_new - targets[0]) >= 0:
                ckpts.append((n_steps[0], t_new, y_new[0]))
                while targets and direction * (t_new - targets[0]) >= 0:
                    targets.pop(0)

        outs, _, res = forward_solve(prob, z0, record_steps=True, on_accept=on_accept)
        ctx.prob, ctx.plan = prob, res.steps
        ctx.ckpt_meta = [(i, t) for i, t, _ in ckpts]
        # Saved through save_for_backward so saved-tensor hooks (offloading, memory
        # accounting) see them.
        ctx.save_for_backward(*[y for _, _, y in ckpts])
        return torch.stack([z0, *outs])

    @staticmethod
    @once_differentiable
    def backward(ctx, gz: Tensor):
        prob: Problem = ctx.prob
        ckpts = [(i, t, y) for (i, t), y in zip(ctx.ckpt_meta, ctx.saved_tensors, strict=True)]
        plan, times, f = ctx.plan, prob.times, prob.f
        params = prob.params
        direction = 1.0 if times[-1] > times[0] else -1.0

        def dyn(t, y):
            return [f(prob.time_tensor(t, gz), y[0])]

        adj = torch.zeros_like(gz[0])
        gp = [torch.zeros_like(p) for p in params]
        bounds = [c[0] for c in ckpts] + [len(plan)]
        for s in range(len(ckpts) - 1, -1, -1):
            i0, i1 = bounds[s], bounds[s + 1]
            t_a = ckpts[s][1]
            t_b = plan[i1 - 1][1]
            idx = [i for i in range(1, len(times))
                   if direction * (times[i] - t_a) > 0 and direction * (times[i] - t_b) <= 0]
            with torch.enable_grad():
                yc = ckpts[s][2].detach().requires_grad_(True)
                res = integrate(dyn, [yc], t_a, t_b, prob.co, plan=plan[i0:i1],
                                out_times=[times[i] for i in idx])
                grads = torch.autograd.grad(
                    [res.y[0], *res.outputs], (yc, *params), [adj, *[gz[i] for i in idx]],
                    allow_unused=True,
                )
            prob.stats.nfe_backward += res.nfe
            adj = grads[0]
            for j, g in enumerate(grads[1:]):
                if g is not None:
                    gp[j] = gp[j] + g
        return (None, adj + gz[0], *gp)


def run_anode(prob: Problem, z0: Tensor) -> Tensor:
    return _ANODE.apply(prob, z0, *prob.params)


# ---------------------------------------------------------------- irdm


# Fixed-step solves have no adjoint tolerance: irdm then resolves their dense output to this
# relative accuracy, or to 1000 rounding units of the dtype when that is coarser.
FIXED_STEP_INTERP_TOL = 1e-10


def interp_tolerance(prob: Problem, like: Tensor) -> tuple[float, float]:
    """(rtol, atol) the interpolant of z(t) must meet: the adjoint tolerances."""
    if prob.control_back is not None:
        return prob.control_back.rtol, prob.control_back.atol
    tol = max(FIXED_STEP_INTERP_TOL, 1e3 * torch.finfo(like.dtype).eps)
    return tol, tol


class _IRDM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Problem, z0: Tensor, *params: Tensor) -> Tensor:
        t0, t_end = prob.times[0], prob.times[-1]
        rtol, atol = interp_tolerance(prob, z0)
        # Node values come from the dense output of the accepted steps: no extra f calls.
        if prob.cheb_nodes == "auto":
            builder = AdaptiveChebyshevBuilder(prob.co, rtol, atol)
            outs, _, _ = forward_solve(prob, z0, on_step=builder.add_step)
            interp, ratio = builder.finish()
            breaks, degrees, values = interp.breaks, interp.degrees, interp.values
        else:
            n = int(prob.cheb_nodes)
            nodes, probes = fixed_grid(t0, t_end, n)
            outs, ext, _ = forward_solve(prob, z0, extra_times=[*nodes[1:], *probes])
            values = torch.stack([z0, *ext[:n]])
            ratio = fixed_estimate(nodes, values, probes, torch.stack(ext[n:]), rtol, atol)
            breaks, degrees = [t0, t_end], [n]
        st = prob.stats
        st.interp_error, st.interp_tol = ratio * rtol, rtol
        st.interp_nodes, st.interp_segments = int(values.shape[0]), len(degrees)
        if ratio > 1.0:
            what = (f"cheb_nodes={prob.cheb_nodes}" if prob.cheb_nodes != "auto"
                    else "cheb_nodes='auto' (single forward steps are not resolved: "
                         "rounding, or a dense output less accurate than the tolerance)")
            warnings.warn(InterpolationWarning(
                f"irdm with {what} cannot interpolate z(t) to the adjoint tolerance "
                f"(rtol {rtol:g}); gradients will be less accurate than asked"
                + ("; use cheb_nodes='auto'" if prob.cheb_nodes != "auto" else ""),
                error=ratio * rtol, tol=rtol), stacklevel=4)
        ctx.prob, ctx.breaks, ctx.degrees = prob, breaks, degrees
        ctx.save_for_backward(values)
        return torch.stack([z0, *outs])

    @staticmethod
    @once_differentiable
    def backward(ctx, gz: Tensor):
        prob: Problem = ctx.prob
        interp = PiecewiseChebyshev(ctx.breaks, ctx.degrees, ctx.saved_tensors[0])
        params, times, f = prob.params, prob.times, prob.f
        n_norm = 1 if prob.seminorm else 1 + len(params)

        def dyn(t, y):
            # t is a float here: backward coefficients never hold tensors.
            _, vj = _vjp(f, prob.time_tensor(t, gz), interp(t), y[0], params)
            return _neg(vj)

        scale = _cotangent_scale(gz)
        gz = gz / scale
        a = gz[-1]
        gp = [torch.zeros_like(p) for p in params]
        for i in range(len(times) - 1, 0, -1):
            res = integrate(
                dyn, [a, *gp], times[i], times[i - 1], prob.co_back, n_active=1,
                fixed_steps=prob.interval_steps(times[i], times[i - 1]),
                control=prob.control_back, n_norm=n_norm, n_solo=1,
            )
            prob.stats.nfe_backward += res.nfe
            a = res.y[0] + gz[i - 1]
            gp = res.y[1:]
        return (None, a * scale, *[g * scale for g in gp])


def run_irdm(prob: Problem, z0: Tensor) -> Tensor:
    return _IRDM.apply(prob, z0, *prob.params)


GRADIENT_METHODS: Registry[Callable[[Problem, Tensor], Tensor]] = Registry("gradient method")
GRADIENT_METHODS.add("backprop", run_backprop, "autograd through the solver steps")
GRADIENT_METHODS.add(
    "rdm", run_rdm, "reverse dynamic ('adjoint') method: backward solve of [z, a, dL/dtheta]"
)
GRADIENT_METHODS.add(
    "anode", run_anode, "checkpointing (K checkpoints), recompute each interval with a graph"
)
GRADIENT_METHODS.add(
    "irdm", run_irdm,
    "interpolated RDM: z(t) from (piecewise) barycentric Chebyshev interpolation, backward "
    "[a, dL/dtheta]",
)
