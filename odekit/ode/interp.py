"""Barycentric Lagrange interpolation on a Chebyshev grid (thesis eq. 2.7), in float64.

Nodes and weights must be a matching pair. We use the Chebyshev points of the second kind
(Lobatto: both ends included, tau_0 = t0, tau_N = t1) with weights (-1)^j, halved at both
ends (Berrut & Trefethen 2004). The thesis formula pairs first-kind weights
sin((2n+1)pi/(2N+2)) with this end-point grid, which is not the polynomial interpolant.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def chebyshev_lobatto(t0: float, t1: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """N+1 = n+1 nodes from t0 to t1 (in that order) and their barycentric weights."""
    if n < 1:
        raise ValueError("need at least 2 Chebyshev nodes (n >= 1)")
    j = np.arange(n + 1, dtype=np.float64)
    x = -np.cos(np.pi * j / n)  # increasing in [-1, 1]
    x[0], x[-1] = -1.0, 1.0
    nodes = 0.5 * (t0 + t1) + 0.5 * (t1 - t0) * x
    nodes[0], nodes[-1] = t0, t1  # exact end hits
    w = (-1.0) ** j
    w[0] *= 0.5
    w[-1] *= 0.5
    return nodes, w


def barycentric_coefficients(t: float, nodes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Lagrange basis values l_j(t) (sum to 1); one-hot on an exact node hit."""
    d = t - nodes
    hit = np.flatnonzero(d == 0.0)
    if hit.size:
        out = np.zeros_like(nodes)
        out[hit[0]] = 1.0
        return out
    r = weights / d
    return r / r.sum()


class BarycentricInterpolant:
    """z(t) from values stored at the Chebyshev nodes: one (1 x N+1) @ (N+1 x numel) matmul."""

    def __init__(self, nodes: np.ndarray, weights: np.ndarray, values: Tensor) -> None:
        self.nodes = nodes
        self.weights = weights
        self.shape = values.shape[1:]
        self.flat = values.reshape(values.shape[0], -1)

    def coefficients(self, t: float) -> Tensor:
        lam = barycentric_coefficients(t, self.nodes, self.weights)
        return torch.from_numpy(lam).to(dtype=self.flat.dtype, device=self.flat.device,
                                        non_blocking=True)

    def __call__(self, t: float) -> Tensor:
        return (self.coefficients(t) @ self.flat).reshape(self.shape)

    def many(self, ts: list[float]) -> Tensor:
        """Values at several times at once: (len(ts), *shape)."""
        lam = np.stack([barycentric_coefficients(t, self.nodes, self.weights) for t in ts])
        lam_t = torch.from_numpy(lam).to(dtype=self.flat.dtype, device=self.flat.device)
        return (lam_t @ self.flat).reshape(len(ts), *self.shape)
