"""The Runge-Kutta stepping loop shared by every solve (forward, adjoint, replay).

A state is a list of tensors. The first `n_active` feed back into the dynamics (their stage
values are formed); the rest are passive quadratures (dL/dtheta in the adjoint solves), which
only need the final b-combination, so no stage states are built for them. Step sizes and times
are Python floats: the only host synchronisation per step is reading the error ratio that
decides accept/reject. Fixed-step solves never synchronise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from odekit.errors import NumericalError
from odekit.ode.tableau import StepCoefficients

# dyn(t, active_state) -> derivatives of all components (active first, then passive).
Dyn = Callable[[float | Tensor, list[Tensor]], list[Tensor]]
# on_step(t_old, t_new, h, y_old[0], stage derivatives of component 0): an accepted step's
# dense output, z(t_old + theta h) = y_old + h sum_i b_i(theta) k_i.
OnStep = Callable[[float, float, float, Tensor, list[Tensor]], None]


@dataclass
class SolveStats:
    """Exact counts of f evaluations (forward / during backward) and of adaptive steps.

    irdm also fills in its interpolant of z(t): `interp_error`, the estimated largest RMS
    interpolation error relative to |z| + atol/rtol (adjoint tolerances), against
    `interp_tol` (the adjoint rtol); `interp_nodes` stored states in `interp_segments` pieces.
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    accepted_steps: int = 0
    rejected_steps: int = 0
    interp_error: float | None = None
    interp_tol: float | None = None
    interp_nodes: int = 0
    interp_segments: int = 0

    def to_dict(self) -> dict[str, int | float | None]:
        return asdict(self)


@dataclass(frozen=True)
class StepControl:
    """Adaptive step-size settings (eq. 1.4-1.5 with the usual safety factor and clamps)."""

    rtol: float = 1e-3
    atol: float = 1e-4
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    min_step: float = 0.0
    max_step: float = math.inf
    max_steps: int = 10_000
    first_step: float | None = None


@dataclass
class SolveResult:
    y: list[Tensor]
    outputs: list[Tensor]  # component 0 at `out_times`, in order
    steps: list[tuple[float, float]] = field(default_factory=list)  # accepted (t, t_new)
    nfe: int = 0
    accepted: int = 0
    rejected: int = 0


def _comb(y: Sequence[Tensor], h: float, coefs: Sequence, ks: Sequence[Sequence[Tensor]],
          lo: int, hi: int, inplace: bool) -> list[Tensor]:
    """y[lo:hi] + h * sum_j coefs[j] * ks[j][lo:hi] (foreach kernels: few Python calls)."""
    if hi <= lo:
        return []
    out: list[Tensor] | None = None
    for cj, kj in zip(coefs, ks, strict=True):
        if isinstance(cj, Tensor):
            scaled = torch._foreach_mul(list(kj[lo:hi]), cj * h)
            if out is None:
                out = list(torch._foreach_add(list(y[lo:hi]), scaled))
            elif inplace:
                torch._foreach_add_(out, scaled)
            else:
                out = list(torch._foreach_add(out, scaled))
            continue
        if cj == 0.0:
            continue
        if out is None:
            out = list(torch._foreach_add(list(y[lo:hi]), list(kj[lo:hi]), alpha=h * cj))
        elif inplace:
            torch._foreach_add_(out, list(kj[lo:hi]), alpha=h * cj)
        else:
            out = list(torch._foreach_add(out, list(kj[lo:hi]), alpha=h * cj))
    return list(y[lo:hi]) if out is None else out


def _norm(xs: Sequence[Tensor], scale: Sequence[Tensor], n_solo: int | None = None) -> Tensor:
    """Eq. 1.4: RMS of xs / scale. The first `n_solo` tensors are normed one by one, the rest
    as one concatenated vector; the result is the max over these blocks."""
    xs = list(xs)
    n_solo = len(xs) if n_solo is None else n_solo
    norms = torch._foreach_norm(torch._foreach_div(xs, list(scale)))
    parts = [n / math.sqrt(max(x.numel(), 1)) for n, x in zip(norms[:n_solo], xs[:n_solo],
                                                              strict=True)]
    if len(xs) > n_solo:
        count = sum(x.numel() for x in xs[n_solo:])
        parts.append(torch.stack(list(norms[n_solo:])).square().sum().sqrt()
                     / math.sqrt(max(count, 1)))
    return parts[0] if len(parts) == 1 else torch.stack(parts).max()


def _rms_ratio(err: list[Tensor], y: list[Tensor], y_new: list[Tensor], rtol: float,
               atol: float, n_solo: int | None = None) -> Tensor:
    """Error ratio with scale atol + rtol max(|y|, |y_new|) (eq. 1.4)."""
    sc = torch._foreach_maximum(torch._foreach_abs(y), torch._foreach_abs(y_new))
    torch._foreach_mul_(sc, rtol)
    torch._foreach_add_(sc, atol)
    return _norm(err, sc, n_solo)


def initial_step(dyn: Dyn, t0: float, y0: list[Tensor], f0: list[Tensor], n_active: int,
                 n_norm: int, direction: float, q: int, ctl: StepControl,
                 n_solo: int | None = None) -> float:
    """Hairer & Wanner's starting step (II.4): one extra f evaluation."""
    with torch.no_grad():
        scale = torch._foreach_add(torch._foreach_mul(torch._foreach_abs(y0[:n_norm]), ctl.rtol),
                                   ctl.atol)
        d0 = float(_norm(list(y0[:n_norm]), scale, n_solo))
        d1 = float(_norm(list(f0[:n_norm]), scale, n_solo))
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, ctl.max_step)
        y1 = torch._foreach_add(list(y0[:n_active]), list(f0[:n_active]), alpha=direction * h0)
    f1 = dyn(t0 + direction * h0, list(y1))
    with torch.no_grad():
        diff = torch._foreach_sub(list(f1[:n_norm]), list(f0[:n_norm]))
        d2 = float(_norm(diff, scale, n_solo)) / h0
    h1 = max(1e-06, h0 * 0.001) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / (q + 1))
    return min(100 * h0, h1, ctl.max_step)


def integrate(
    dyn: Dyn,
    y0: list[Tensor],
    t0: float,
    t1: float,
    co: StepCoefficients,
    *,
    n_active: int | None = None,
    fixed_steps: int | None = None,
    plan: Sequence[tuple[float, float]] | None = None,
    control: StepControl | None = None,
    n_norm: int | None = None,
    n_solo: int | None = None,
    out_times: Sequence[float] = (),
    record_steps: bool = False,
    on_accept: Callable[[float, list[Tensor]], None] | None = None,
    on_step: OnStep | None = None,
) -> SolveResult:
    """Integrate from t0 to t1 (either direction) with exactly one of: `fixed_steps` equal
    steps, a replay `plan` of (t, t_new) steps, or adaptive `control` (needs error weights).

    `out_times` (sorted from t0 towards t1, each in (t0, t1]) are read for component 0 from
    the dense output of the step that contains them, with no extra f evaluation; `on_step`
    sees every accepted step's dense-output data. The error
    norm covers the first `n_norm` components; the first `n_solo` of them are normed one by
    one and the rest as one vector (default: every component on its own).
    """
    n_total = len(y0)
    n_active = n_total if n_active is None else n_active
    n_norm = n_total if n_norm is None else n_norm
    direction = 1.0 if t1 > t0 else -1.0
    inplace = not torch.is_grad_enabled()
    like = y0[0]
    res = SolveResult(y=list(y0), outputs=[])
    out_times = list(out_times)
    oi = 0

    y = list(y0)
    t = t0
    k1: list[Tensor] | None = None

    def take_outputs(t_old: float, t_new: float, h: float, y_old, y_new, ks) -> None:
        nonlocal oi
        thetas, idx_exact = [], []
        start = oi
        while oi < len(out_times) and direction * (out_times[oi] - t_new) <= 0:
            tau = out_times[oi]
            if tau == t_new:
                idx_exact.append(oi - start)
            thetas.append((tau - t_old) / h)
            oi += 1
        if not thetas:
            return
        if len(idx_exact) == len(thetas):
            res.outputs.extend(y_new[0] for _ in thetas)
            return
        w = co.dense_weights(thetas, like)  # (m, s)
        kstack = torch.stack([k[0] for k in ks])  # (s, *shape)
        vals = torch.tensordot(w, kstack, dims=1).mul_(h) if inplace else \
            torch.tensordot(w, kstack, dims=1) * h
        vals = vals + y_old[0]
        for j in range(len(thetas)):
            res.outputs.append(y_new[0] if j in idx_exact else vals[j])

    def do_step(t: float, h: float, y: list[Tensor], k1: list[Tensor]):
        ks = [k1]
        last_state = None
        for i in range(1, co.stages):
            yi = _comb(y, h, co.a[i], ks, 0, n_active, inplace)
            ci = co.c[i]
            ks.append(dyn(t + ci * h, yi))
            last_state = yi
        if co.fsal and last_state is not None:
            # Last stage state of an FSAL pair is y_new itself (a_s = b).
            y_new = last_state + _comb(y, h, co.b, ks, n_active, n_total, inplace)
        else:
            y_new = _comb(y, h, co.b, ks, 0, n_total, inplace)
        return ks, y_new

    def finish_step(t_old, t_new, h, y_old, y_new, ks):
        res.accepted += 1
        if out_times:
            take_outputs(t_old, t_new, h, y_old, y_new, ks)
        if record_steps:
            res.steps.append((t_old, t_new))
        if on_accept is not None:
            on_accept(t_new, y_new)
        if on_step is not None:
            on_step(t_old, t_new, h, y_old[0], [k[0] for k in ks])

    if plan is not None or fixed_steps is not None:
        if plan is None:
            n = int(fixed_steps)  # type: ignore[arg-type]
            grid = [t0 + (t1 - t0) * i / n for i in range(n)] + [t1]
            plan = list(itertools.pairwise(grid))
        for t_old, t_new in plan:
            h = t_new - t_old
            if k1 is None:
                k1 = dyn(t_old, y[:n_active])
                res.nfe += 1
            ks, y_new = do_step(t_old, h, y, k1)
            res.nfe += co.stages - 1
            finish_step(t_old, t_new, h, y, y_new, ks)
            y, t = y_new, t_new
            k1 = ks[-1] if co.fsal else None
        res.y = y
        return res

    if co.e is None or control is None:
        raise ValueError("adaptive integration needs error weights and a StepControl")
    ctl = control
    k1 = dyn(t0, y[:n_active])
    res.nfe += 1
    if ctl.first_step is not None:
        h = direction * min(abs(ctl.first_step), ctl.max_step)
    else:
        h = direction * initial_step(dyn, t0, y, k1, n_active, n_norm, direction, co.q, ctl,
                                     n_solo)
        res.nfe += 1
    expo = 1.0 / (co.q + 1)
    last_rejected = False
    while direction * (t1 - t) > 0:
        if res.accepted + res.rejected >= ctl.max_steps:
            raise NumericalError(
                f"adaptive solver took more than {ctl.max_steps} steps at t={t:.6g}",
                "loosen rtol/atol, raise max_steps, or use a fixed-step solver",
            )
        if k1 is None:
            k1 = dyn(t, y[:n_active])
            res.nfe += 1
        hit_end = direction * (t + 1.01 * h - t1) > 0
        if hit_end:
            h = t1 - t
        ks, y_new = do_step(t, h, y, k1)
        res.nfe += co.stages - 1
        with torch.no_grad():
            err = _comb([torch.zeros_like(x) for x in y[:n_norm]], h, co.e, ks, 0, n_norm, True)
            ratio = float(_rms_ratio(err, y[:n_norm], y_new[:n_norm], ctl.rtol, ctl.atol,
                                      n_solo))
        if ratio <= 1.0:  # accept (NaN compares False and is rejected)
            t_new = t1 if hit_end else t + h
            finish_step(t, t_new, h, y, y_new, ks)
            y, t = y_new, t_new
            k1 = ks[-1] if co.fsal else None
            top = 1.0 if last_rejected else ctl.max_factor
            factor = top if ratio == 0.0 else min(top, max(ctl.min_factor,
                                                           ctl.safety * ratio ** -expo))
            last_rejected = False
        else:
            res.rejected += 1
            factor = ctl.min_factor if not math.isfinite(ratio) else min(
                1.0, max(ctl.min_factor, ctl.safety * ratio ** -expo))
            last_rejected = True
        h = h * factor
        if abs(h) > ctl.max_step:
            h = direction * ctl.max_step
        if direction * (t1 - t) > 0 and (abs(h) < ctl.min_step or t + h == t):
            raise NumericalError(
                f"adaptive step size underflow (h={abs(h):.3g}) at t={t:.6g}",
                "the dynamics may be stiff or blowing up; loosen rtol/atol or check the model",
            )
    res.y = y
    return res
