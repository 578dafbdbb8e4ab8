"""Krylov solvers on flat vectors with matrix-free operators: CG and Steihaug-CG.

Steihaug's truncated CG minimises the quadratic model m(s) = g^T s + s^T H s / 2 over
||s|| <= radius: CG iterations from s = 0 that stop at the boundary (when an iterate leaves
the ball or a direction of non-positive curvature appears) or when the residual is small.
Every iterate lowers the model, and the iterates' norms increase (Steihaug 1983), so the
step never lies outside the trust region.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


@dataclass
class KrylovResult:
    """The step, how many operator products it took, and why the iteration stopped."""

    step: Tensor
    iterations: int
    reason: str
    model_decrease: float = 0.0


def _to_boundary(s: Tensor, d: Tensor, radius: float) -> float:
    """tau >= 0 with ||s + tau d|| = radius."""
    dd = float(d @ d)
    sd = float(s @ d)
    ss = float(s @ s)
    disc = max(sd * sd + dd * (radius * radius - ss), 0.0)
    return (-sd + math.sqrt(disc)) / max(dd, 1e-300)


def quadratic_model(g: Tensor, hv: Tensor, s: Tensor) -> float:
    """m(s) = g^T s + s^T H s / 2 given hv = H s."""
    return float(g @ s + 0.5 * (s @ hv))


def steihaug_cg(hess: Operator, g: Tensor, radius: float, max_iter: int, rtol: float = 1e-2) -> KrylovResult:
    """Approximately minimise g^T s + s^T H s / 2 subject to ||s|| <= radius (Steihaug-CG).

    Stops after ``max_iter`` Hessian products, at the boundary, on negative curvature, or when
    ||r|| <= rtol ||g||. ``model_decrease`` is -m(step) >= 0.
    """
    s = torch.zeros_like(g)
    r = g.clone()
    d = -r
    g_norm = float(g.norm())
    if g_norm == 0.0:
        return KrylovResult(s, 0, "zero gradient")
    hs = torch.zeros_like(g)  # H s, kept up to date so m(s) is exact without another product
    rr = float(r @ r)
    for it in range(1, max_iter + 1):
        hd = hess(d)
        curv = float(d @ hd)
        if curv <= 0.0:
            tau = _to_boundary(s, d, radius)
            s, hs = s + tau * d, hs + tau * hd
            return KrylovResult(s, it, "negative curvature", -quadratic_model(g, hs, s))
        alpha = rr / curv
        s_next = s + alpha * d
        if float(s_next.norm()) >= radius:
            tau = _to_boundary(s, d, radius)
            s, hs = s + tau * d, hs + tau * hd
            return KrylovResult(s, it, "trust-region boundary", -quadratic_model(g, hs, s))
        s, hs = s_next, hs + alpha * hd
        r = r + alpha * hd
        rr_next = float(r @ r)
        if math.sqrt(rr_next) <= rtol * g_norm:
            return KrylovResult(s, it, "converged", -quadratic_model(g, hs, s))
        d = -r + (rr_next / rr) * d
        rr = rr_next
    return KrylovResult(s, max_iter, "max iterations", -quadratic_model(g, hs, s))


def conjugate_gradient(op: Operator, b: Tensor, max_iter: int, rtol: float = 1e-12) -> KrylovResult:
    """Solve H x = b for symmetric positive definite H by CG (x0 = 0)."""
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return KrylovResult(x, 0, "zero right-hand side")
    d = r.clone()
    rr = float(r @ r)
    for it in range(1, max_iter + 1):
        hd = op(d)
        alpha = rr / float(d @ hd)
        x = x + alpha * d
        r = r - alpha * hd
        rr_next = float(r @ r)
        if math.sqrt(rr_next) <= rtol * b_norm:
            return KrylovResult(x, it, "converged")
        d = r + (rr_next / rr) * d
        rr = rr_next
    return KrylovResult(x, max_iter, "max iterations")
