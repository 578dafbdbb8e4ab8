"""The inner VarPro problem: W(theta) = argmin_W Phi(W, theta) for fixed features, in float64.

Phi(W) = (1/n) sum_i L(W fa_i, c_i) + alpha/2 ||W||_F^2 with fa_i = [F(y_i, theta); 1] (the
bias is the last column of W, shape (t, m + 1)). Least squares (L = ||x - c||^2 / 2) has the
closed form W = (C^T Fa / n) (Fa^T Fa / n + alpha I)^-1, evaluated with the SVD of Fa, which
also inverts the Hessian later. Cross-entropy has none: a Newton-Krylov trust-region method
(Steihaug-CG on exact Hessian products) from W = 0 solves it to ||grad|| <= tol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from odekit.errors import NumericalError
from odekit.methods.varpro.krylov import conjugate_gradient, steihaug_cg

LOSSES = ("ls", "ce")
PINV_RCOND = 1e-12


def augment(features: Tensor) -> Tensor:
    """[F, 1]: the bias of the linear head is the last column of W."""
    ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
    return torch.cat([features, ones], dim=1)


@dataclass
class InnerProblem:
    """Phi(W) for fixed augmented features ``fa`` (n, m + 1); targets (n, t) floats or (n,) labels."""

    fa: Tensor
    targets: Tensor
    loss: str
    alpha: float
    num_outputs: int
    _svd: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.fa.shape[0])

    def outputs(self, W: Tensor) -> Tensor:
        return self.fa @ W.T

    def value(self, W: Tensor) -> float:
        X = self.outputs(W)
        if self.loss == "ls":
            data = 0.5 * float(((X - self.targets) ** 2).sum()) / self.n
        else:
            data = float(F.cross_entropy(X, self.targets, reduction="mean"))
        return data + 0.5 * self.alpha * float((W * W).sum())

    def loss_grad(self, X: Tensor) -> Tensor:
        """dL/dx per sample (rows), not divided by n."""
        if self.loss == "ls":
            return X - self.targets
        return torch.softmax(X, dim=1) - F.one_hot(self.targets, self.num_outputs).to(X.dtype)

    def loss_hess(self, X: Tensor, Z: Tensor) -> Tensor:
        """The per-sample loss Hessian at X applied to the rows of Z (identity for LS)."""
        if self.loss == "ls":
            return Z
        P = torch.softmax(X, dim=1)
        PZ = P * Z
        return PZ - P * PZ.sum(dim=1, keepdim=True)

    def grad(self, W: Tensor) -> Tensor:
        return self.loss_grad(self.outputs(W)).T @ self.fa / self.n + self.alpha * W

    def hess(self, W: Tensor, dW: Tensor, X: Tensor | None = None) -> Tensor:
        X = self.outputs(W) if X is None else X
        return self.loss_hess(X, self.fa @ dW.T).T @ self.fa / self.n + self.alpha * dW

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._svd is None:
            U, s, Vh = torch.linalg.svd(self.fa, full_matrices=False)
            self._svd = (U, s, Vh.T)
        return self._svd

    def _gram_inverse(self, R: Tensor) -> Tensor:
        """R (Fa^T Fa / n + alpha I)^-1 from the SVD of Fa (pseudo-inverse when alpha = 0)."""
        _, s, V = self.svd()
        eig = s * s / self.n + self.alpha
        keep = eig > PINV_RCOND * float(eig.max()) if self.alpha == 0 else torch.ones_like(eig, dtype=torch.bool)
        inv = torch.where(keep, 1.0 / torch.where(keep, eig, torch.ones_like(eig)), torch.zeros_like(eig))
        RV = R @ V
        out = (RV * inv) @ V.T
        if self.alpha > 0 and V.shape[1] < V.shape[0]:  # fewer samples than features: null space of Fa
            out = out + (R - RV @ V.T) / self.alpha
        return out

    def solve_hess(self, W: Tensor, R: Tensor, tol: float = 1e-12) -> Tensor:
        """H_WW(W)^-1 R: LS reuses the SVD of Fa; CE runs CG on exact Hessian products."""
        if self.loss == "ls":
            return self._gram_inverse(R)
        X = self.outputs(W)
        res = conjugate_gradient(lambda v: self.hess(W, v.view_as(W), X).reshape(-1), R.reshape(-1),
                                 max_iter=4 * R.numel(), rtol=tol)  # fmt: skip
        return res.step.view_as(W)


@dataclass
class InnerResult:
    W: Tensor
    grad_norm: float
    iterations: int
    krylov_iterations: int


def solve_inner(problem: InnerProblem, tol: float = 1e-10, max_iter: int = 200, W0: Tensor | None = None) -> InnerResult:
    """W(theta): closed form (LS) or Newton-Krylov trust region from W0 (default 0; CE)."""
    t, k = problem.num_outputs, problem.fa.shape[1]
    if problem.loss == "ls":
        W = problem._gram_inverse(problem.targets.T @ problem.fa / problem.n)
        return InnerResult(W, float(problem.grad(W).norm()), 1, 0)
    W = torch.zeros(t, k, dtype=problem.fa.dtype, device=problem.fa.device) if W0 is None else W0.clone()
    radius, phi, krylov = 1.0, problem.value(W), 0
    for it in range(1, max_iter + 1):
        g = problem.grad(W)
        g_norm = float(g.norm())
        if g_norm <= tol:
            return InnerResult(W, g_norm, it - 1, krylov)
        X = problem.outputs(W)

        def hess(v: Tensor, W: Tensor = W, X: Tensor = X) -> Tensor:
            return problem.hess(W, v.view_as(W), X).reshape(-1)

        step = steihaug_cg(hess, g.reshape(-1), radius, max_iter=W.numel(), rtol=min(0.5, math.sqrt(g_norm)))
        krylov += step.iterations
        trial = W + step.step.view_as(W)
        phi_trial = problem.value(trial)
        rho = (phi - phi_trial) / max(step.model_decrease, 1e-300)
        s_norm = float(step.step.norm())
        if rho < 0.25:
            radius = 0.25 * s_norm
        elif rho > 0.75 and s_norm >= 0.99 * radius:
            radius = 2.0 * radius
        if rho > 1e-4 or (phi_trial < phi and step.model_decrease < 1e-14 * max(abs(phi), 1.0)):
            W, phi = trial, phi_trial
        if radius < 1e-14:
            break
    g_norm = float(problem.grad(W).norm())
    if not math.isfinite(g_norm):
        raise NumericalError("the inner cross-entropy solve for W diverged", "raise the W regularization (`regularization`)")
    return InnerResult(W, g_norm, max_iter, krylov)
