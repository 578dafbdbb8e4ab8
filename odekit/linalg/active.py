"""Active-subspace helpers shared by ``asnet`` and ``attack`` (thesis ch. 6).

The gradient covariance C = E[g g^T] is uncentred, so its eigenpairs are the squared singular
values / right singular vectors of the (B, D) gradient matrix G (rows g_i^T), up to 1/B.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError

__all__ = ["active_count", "dominant_direction", "dominant_direction_across_ranks"]


def active_count(singular_values: Tensor, eps: float, form: str = "eq6.17") -> int:
    """Number of active neurons for threshold ``eps``.

    ``form="eq6.17"`` (default, the sketch rule): smallest i with
    sqrt(s_1^2 + ... + s_i^2) / sqrt(s_1^2 + ... + s_r^2) >= 1 - eps.
    ``form="eq6.12"`` (eigenvalue rule with lambda_i = s_i^2): smallest i with
    (lambda_1 + ... + lambda_i) / (lambda_1 + ... + lambda_n) >= 1 - eps.
    """
    if not 0.0 <= eps < 1.0:
        raise UsageError(
            f"energy tolerance eps must lie in [0, 1), got {eps}",
            "the thesis default is 0.05 (asnet `energy_tol` 0.05)",
        )
    if form not in ("eq6.17", "eq6.12"):
        raise UsageError(f"unknown active-count form '{form}'", "use eq6.17 or eq6.12")
    s = singular_values.detach().double().flatten().abs()
    if s.numel() == 0:
        raise UsageError("active_count needs at least one singular value")
    s, _ = torch.sort(s, descending=True)
    sq = s.pow(2)
    total = float(sq.sum())
    if total <= 0:
        return 1
    ratio = torch.cumsum(sq, 0) / total
    if form == "eq6.17":
        ratio = ratio.sqrt()
    target = 1.0 - eps
    hit = torch.nonzero(ratio >= target - 1e-12)
    return int(hit[0]) + 1 if hit.numel() else int(s.numel())


def dominant_direction(grads: Tensor, iters: int | None = None, seed: int = 0) -> Tensor:
    """Top right singular vector (D,) of a (B, D) gradient matrix: the dominant eigenvector of
    the uncentred covariance G^T G / B. Exact small SVD by default; ``iters`` switches to power
    iteration (cheaper when D and B are both large). The sign is fixed so that the entry of
    largest magnitude is positive; returned in the dtype/device of ``grads``."""
    if grads.dim() == 1:
        grads = grads.unsqueeze(0)
    g = grads.reshape(grads.shape[0], -1)
    if g.shape[0] == 0:
        raise UsageError("dominant_direction needs at least one gradient")
    work = g.to(torch.float64)
    if not bool(torch.isfinite(work).all()):
        raise NumericalError("gradients hold NaN or inf", "check the model and the loss")
    if float(work.abs().max()) == 0.0:
        raise NumericalError("all gradients are zero; there is no dominant direction")
    if iters is None:
        _, _, vh = torch.linalg.svd(work, full_matrices=False)
        v = vh[0]
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(work.shape[1], generator=gen, dtype=torch.float64).to(work.device)
        v = v / v.norm()
        for _ in range(max(1, iters)):
            w = work.T @ (work @ v)
            nrm = float(w.norm())
            if nrm == 0.0 or not math.isfinite(nrm):
                break
            v = w / nrm
    k = int(torch.argmax(v.abs()))
    if float(v[k]) < 0:
        v = -v
    return v.to(grads.dtype)


def dominant_direction_across_ranks(grads: Tensor, dist: Distributed) -> Tensor:
    """`dominant_direction` of the gradients of every rank stacked (issue 15).

    Exact: the (D, D) Gram matrices G_k^T G_k are summed over the ranks and the top eigenvector
    of the sum is taken (the top right singular vector of the stacked G), with the same sign
    rule. A rank may hold no gradients (an empty (0, D) matrix). World 1: `dominant_direction`."""
    if dist.world_size == 1:
        return dominant_direction(grads)
    g = (grads.flatten(1) if grads.dim() > 1 else grads.unsqueeze(0)).to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise NumericalError("gradients hold NaN or inf", "check the model and the loss")
    gram = dist.all_reduce_sum(g.T @ g)
    if float(gram.abs().max()) == 0.0:
        raise NumericalError("all gradients are zero; there is no dominant direction")
    _, vecs = torch.linalg.eigh(gram)
    v = vecs[:, -1]
    k = int(torch.argmax(v.abs()))
    if float(v[k]) < 0:
        v = -v
    return v.to(grads.dtype)
