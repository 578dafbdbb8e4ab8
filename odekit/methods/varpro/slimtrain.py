"""slimTrain-style training: sampled Tikhonov updates of W, Adam/SGD on theta (mini-batches).

Per batch, W is the solution of a regularised least-squares problem on the features of the
current batch and the previous ``memory - 1`` batches (stored, not recomputed),

    W_k = argmin_W ||Fa_mem W^T - C_mem||^2 / 2 + lambda/2 ||W - W_{k-1}||^2,

with lambda chosen per batch by generalized cross-validation (GCV) on the SVD of Fa_mem; then
theta takes one optimizer step on the batch loss at the new W (VarPro: grad_W = 0 there up
to the sampling). Least squares only, as in slimTrain (Newman et al., arXiv:2109.14002).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GCV_GRID = torch.logspace(-10, 2, 49, dtype=torch.float64)


def gcv_lambda(U: Tensor, s: Tensor, R: Tensor) -> float:
    """The lambda of GCV(lambda) = N ||(I - A) R||^2 / trace(I - A)^2 (a log grid, relative to s_max^2).

    A = U diag(s^2 / (s^2 + lambda)) U^T is the influence matrix of the Tikhonov fit of R.
    """
    N = R.shape[0]
    UR = U.T @ R
    outside = float((R * R).sum() - (UR * UR).sum())  # part of R outside range(U)
    scale = float(s.max()) ** 2 if s.numel() else 1.0
    best, best_value = 1.0, math.inf
    for rel in GCV_GRID.tolist():
        lam = rel * max(scale, 1e-300)
        shrink = lam / (s * s + lam)  # 1 - filter factors
        resid = outside + float(((shrink[:, None] * UR) ** 2).sum())
        dof = N - float((1.0 - shrink).sum())
        if dof <= 0:
            continue
        value = N * resid / dof**2
        if value < best_value:
            best, best_value = lam, value
    return best


def sampled_tikhonov(fa: Tensor, C: Tensor, W_prev: Tensor) -> tuple[Tensor, float]:
    """(W, lambda): W = W_prev + Z with Z^T = V diag(s / (s^2 + lambda)) U^T (C - Fa W_prev^T)."""
    U, s, Vh = torch.linalg.svd(fa, full_matrices=False)
    R = C - fa @ W_prev.T
    lam = gcv_lambda(U, s, R)
    Zt = Vh.T @ ((s / (s * s + lam))[:, None] * (U.T @ R))
    return W_prev + Zt.T, lam


class SampledMemory:
    """The last ``size`` batches' augmented features and targets (float64)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[Tensor, Tensor]] = []

    def push(self, fa: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        self.items = [*self.items[-(self.size - 1) :], (fa, C)] if self.size > 1 else [(fa, C)]
        return torch.cat([f for f, _ in self.items]), torch.cat([c for _, c in self.items])
