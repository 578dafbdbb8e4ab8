"""The paper's GNvpro step: an Arnoldi (GMRES) basis and the exact trust-region step in it.

``KrylovBasis.build`` runs m Arnoldi steps on the Gauss-Newton operator H from the negative
gradient, Q_{m+1} Hbar_m = H Q_m (orthonormal Q, full re-orthogonalisation), and keeps the
projected matrix T = Q_m^T H Q_m (symmetrised: H is symmetric). The step for a radius Delta
is s = Q_m z with z the *exact* minimiser of the projected model

    m(z) = -beta z_1 + z^T T z / 2  subject to  ||z|| <= Delta,  beta = ||g||,

from the eigen-decomposition of T (Moré-Sorensen: z = -(T + mu I)^-1 g_s with mu >= 0,
T + mu I positive semidefinite, mu (Delta - ||z||) = 0; the "hard case" adds the lowest
eigenvector). A rejected step shrinks Delta and re-solves the small problem on the same
basis: no new operator products. ``newton_norm`` is ||T^-1 beta e_1||, the full Gauss-Newton
step in the subspace (the paper's initial radius).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


def trust_region_exact(T: Tensor, g: Tensor, radius: float, tol: float = 1e-12) -> Tensor:
    """argmin_z g^T z + z^T T z / 2 over ||z|| <= radius for a small symmetric T (dense, exact)."""
    lam, V = torch.linalg.eigh(0.5 * (T + T.T))
    gt = V.T @ g
    lo = max(0.0, -float(lam[0]))
    scale = max(float(lam.abs().max()), 1.0)

    def z_of(mu: float) -> Tensor:
        d = lam + mu
        safe = torch.where(d.abs() > tol * scale, d, torch.full_like(d, math.inf))
        return -(gt / safe)

    small = (lam + lo).abs() <= tol * scale  # the eigenvalues where T + lo I is singular
    if not bool((gt[small].abs() > tol * max(float(gt.norm()), 1e-300)).any()):
        z_lo = z_of(lo)  # lo = 0: the (minimum-norm) Newton step
        if float(z_lo.norm()) <= radius:
            if lo == 0.0:
                return V @ z_lo
            tau = math.sqrt(max(radius**2 - float(z_lo @ z_lo), 0.0))  # the hard case
            return V @ z_lo + tau * V[:, int(torch.nonzero(small)[0])]
    # ||z(mu)|| decreases in mu > lo: bisect ||z(mu)|| = radius on a bracket
    a, b = lo, lo + float(gt.norm()) / radius * (1 + 1e-12)  # at b, ||z|| <= ||g|| / (b - lo) <= radius
    for _ in range(200):
        mid = 0.5 * (a + b)
        if float(z_of(mid).norm()) > radius:
            a = mid
        else:
            b = mid
        if b - a <= 1e-15 * max(b, 1.0):
            break
    return V @ z_of(b)


@dataclass
class KrylovBasis:
    """Q_m (p, m), the projected T (m, m), beta = ||g|| and the products used to build it."""

    Q: Tensor
    T: Tensor
    beta: float
    products: int

    @classmethod
    def build(cls, hess: Operator, g: Tensor, m: int, breakdown: float = 1e-12) -> KrylovBasis:
        """m Arnoldi steps from q_1 = -g / ||g|| (fewer when the Krylov space is invariant)."""
        beta = float(g.norm())
        Q = [-g / beta]
        H = torch.zeros(m + 1, m, dtype=g.dtype, device=g.device)
        k = 0
        for j in range(m):
            w = hess(Q[j])
            k = j + 1
            for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to rounding
                B = torch.stack(Q, dim=1)
                coef = B.T @ w
                H[: j + 1, j] += coef
                w = w - B @ coef
            h = float(w.norm())
            H[j + 1, j] = h
            if h <= breakdown * max(beta, 1.0) or j == m - 1:
                break
            Q.append(w / h)
        return cls(torch.stack(Q[:k], dim=1), H[:k, :k], beta, k)

    @property
    def size(self) -> int:
        return int(self.Q.shape[1])

    def _g(self) -> Tensor:
        e = torch.zeros(self.size, dtype=self.T.dtype, device=self.T.device)
        e[0] = -self.beta
        return e

    def newton_norm(self) -> float:
        """||z|| of the full Gauss-Newton step in the subspace (inf if T is not positive definite)."""
        lam, V = torch.linalg.eigh(0.5 * (self.T + self.T.T))
        if float(lam[0]) <= 0:
            return math.inf
        return float((V.T @ self._g() / lam).norm())

    def step(self, radius: float) -> tuple[Tensor, float]:
        """(s, predicted decrease -m(z)) of the exact subspace trust-region step."""
        g = self._g()
        z = trust_region_exact(self.T, g, radius)
        predicted = -float(g @ z + 0.5 * z @ (0.5 * (self.T + self.T.T)) @ z)
        return self.Q @ z, predicted
