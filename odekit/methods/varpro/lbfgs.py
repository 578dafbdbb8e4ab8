"""L-BFGS on the reduced objective Phi_red(theta) (W eliminated by the inner solve).

``torch.optim.LBFGS`` (strong-Wolfe line search) over the feature weights theta; every
evaluation runs the network forward, solves the inner problem for W(theta) and backpropagates
grad Phi_red = J_theta F^T (G W / n) + alpha_theta theta: 2 work units (a forward and a
backward pass over the training set), the same units as GNvpro and Adam. ``step`` is called
once per L-BFGS iteration (the memory carries over); its first evaluation, at the point the
previous line search accepted, is served from a cache and not counted again. The objective
is divided by its starting value: the minimiser is the same, and torch's fixed thresholds
(a curvature pair is kept only when y^T s > 1e-10) stay meaningful for small Phi (raw targets).
A line search without decrease (possible on the steep, badly scaled Phi_red of a small alpha)
restarts L-BFGS with its memory cleared and a 10x shorter first step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from odekit.methods.varpro.gnvpro import ReducedPoint
from odekit.methods.varpro.separable import Separable

MAX_EVALS_PER_ITER = 1.25  # torch's default max_eval / max_iter
MAX_RESTARTS = 6  # a failed line search restarts L-BFGS (memory cleared) with a 10x shorter first step


@dataclass
class LbfgsRecord:
    iteration: int
    work_units: float
    seconds: float
    phi: float
    grad_norm: float
    evaluations: int


def reduced_lbfgs(
    sep: Separable,
    x: Tensor,
    targets: Tensor,
    loss: str,
    alpha_theta: float,
    alpha_w: float,
    iters: int,
    *,
    history_size: int = 20,
    callback: Callable[[LbfgsRecord, ReducedPoint], None] | None = None,
) -> tuple[ReducedPoint, float]:
    """At most ``iters`` iterations and 1.25 x ``iters`` evaluations; theta is updated in place."""
    def optimizer(lr: float) -> torch.optim.LBFGS:
        return torch.optim.LBFGS(sep.theta, lr=lr, max_iter=1, history_size=history_size, line_search_fn="strong_wolfe",
                                 tolerance_grad=1e-12, tolerance_change=1e-14)  # fmt: skip

    opt, lr, restarts = optimizer(1.0), 1.0, 0
    recent: deque[ReducedPoint] = deque(maxlen=4)  # the last evaluations (line-search trial points)
    evals = 0
    start = time.perf_counter()

    def evaluate() -> ReducedPoint:
        nonlocal evals
        theta = sep.theta_vector()
        for p in recent:
            if torch.equal(p.theta, theta):
                return p
        point = ReducedPoint.at(sep, x, targets, loss, alpha_theta, alpha_w)
        point.gradient(for_products=False)
        recent.append(point)
        evals += 1
        return point

    def closure() -> float:
        point = evaluate()
        assert point.grad is not None
        start_ = 0
        for p in sep.theta:
            p.grad = (point.grad[start_ : start_ + p.numel()] / scale).view_as(p).to(p.dtype).clone()
            start_ += p.numel()
        return point.phi / scale

    point = evaluate()
    scale = max(point.phi, 1e-300)
    for it in range(1, iters + 1):
        if evals >= math.ceil(MAX_EVALS_PER_ITER * iters):
            break
        before, theta = evals, sep.theta_vector()
        opt.step(closure)  # type: ignore[no-untyped-call]
        if evals == before:  # no trial point: torch's tolerances say it has converged
            break
        if torch.equal(sep.theta_vector(), theta):  # the line search found no decrease: restart, 10x shorter
            restarts += 1
            if restarts > MAX_RESTARTS:
                break
            lr *= 0.1
            opt = optimizer(lr)
        point = evaluate()
        assert point.grad is not None
        if callback is not None:
            rec = LbfgsRecord(it, 2.0 * evals, time.perf_counter() - start, point.phi, float(point.grad.norm()), evals)
            callback(rec, point)
        if float(point.grad.norm()) <= 1e-12:
            break
    sep.set_theta(point.theta)
    sep.set_W(point.W)
    return point, 2.0 * evals
