"""L-BFGS on the reduced objective Phi_red(theta) (W eliminated by the inner solve).

``torch.optim.LBFGS`` (strong-Wolfe line search) over the feature weights theta; every
evaluation runs the network forward, solves the inner problem for W(theta) and backpropagates
grad Phi_red = J_theta F^T (G W / n) + alpha_theta theta: 2 work units (a forward and a
backward pass over the training set), the same units as GNvpro and Adam. ``step`` is called
once per L-BFGS iteration (the memory carries over); its first evaluation, at the point the
previous line search accepted, is served from a cache and not counted again.
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
    opt = torch.optim.LBFGS(sep.theta, lr=1.0, max_iter=1, history_size=history_size, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)  # fmt: skip
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
            p.grad = point.grad[start_ : start_ + p.numel()].view_as(p).to(p.dtype).clone()
            start_ += p.numel()
        return point.phi

    point = evaluate()
    for it in range(1, iters + 1):
        if evals >= math.ceil(MAX_EVALS_PER_ITER * iters):
            break
        before = evals
        opt.step(closure)  # type: ignore[no-untyped-call]
        if evals == before:  # no trial point: torch's tolerances say it has converged
            break
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
