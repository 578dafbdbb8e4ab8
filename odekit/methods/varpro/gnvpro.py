"""GNvpro: Gauss-Newton-Krylov trust region on the reduced objective Phi_red(theta).

Phi_red(theta) = Phi(W(theta), theta) with W(theta) from the inner solve. Since
grad_W Phi = 0 at W(theta), grad Phi_red = grad_theta Phi(W(theta), theta). The Gauss-Newton
matrix is J^T (H_L / n) J + alpha_W J_W^T J_W + alpha_theta I (the regularisers' Gauss-Newton
terms included) with the Jacobian of the outputs
X(theta) = Fa(theta) W(theta)^T,

    J v = dFa W^T + Fa dW^T,   dW = J_theta W v = -H_WW^-1 (d/dtheta grad_W Phi) v,

where (d/dtheta grad_W Phi) v = (H_L[dFa W^T]^T Fa + G^T dFa) / n for dFa = J_theta Fa v and
G = dL/dX. `ReducedPoint` carries all of this at one theta; `gnvpro` is the outer loop.
Work units count network passes over the training set: forward 1, backward (vjp) 1, jvp 1;
an outer iteration costs 2 + 2r (trial forward, gradient, r Hessian products), as on the slides.
Two steps: Steihaug-CG (``steihaug``) or the paper's (``gmres-subspace``: an Arnoldi basis of
m products and the exact trust-region step in it, radius0 = the full Gauss-Newton step; a
rejected step re-solves on the same basis and costs only the trial forward pass).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from odekit.errors import NumericalError
from odekit.methods.varpro.inner import InnerProblem, solve_inner
from odekit.methods.varpro.krylov import steihaug_cg
from odekit.methods.varpro.separable import Linearization, Separable
from odekit.methods.varpro.subspace import KrylovBasis
from odekit.progress import Progress, silent_if_none

TR_SOLVERS = ("steihaug", "gmres-subspace")


@dataclass
class ReducedPoint:
    """Everything at one theta: features (with graph), W(theta), outputs and Phi_red."""

    sep: Separable
    theta: Tensor
    lin: Linearization
    problem: InnerProblem
    W: Tensor
    X: Tensor
    G: Tensor
    phi: float
    alpha_theta: float
    grad: Tensor | None = None

    @classmethod
    def at(cls, sep: Separable, x: Tensor, targets: Tensor, loss: str, alpha_theta: float, alpha_w: float,
           inner_tol: float = 1e-10) -> ReducedPoint:  # fmt: skip
        theta = sep.theta_vector()
        lin = Linearization.at(sep, x)
        fa = sep.augment(lin.F.detach().to(torch.float64))
        problem = InnerProblem(fa, targets, loss, alpha_w, sep.num_outputs)
        W = solve_inner(problem, tol=inner_tol).W
        X = problem.outputs(W)
        phi = problem.value(W) + 0.5 * alpha_theta * float(theta.double() @ theta.double())
        if not math.isfinite(phi):
            raise NumericalError("the reduced objective is not finite", "lower the trust-region radius or use more RK4 steps")
        return cls(sep, theta, lin, problem, W, X, problem.loss_grad(X), phi, alpha_theta)

    @property
    def n(self) -> int:
        return self.problem.n

    @property
    def m(self) -> int:
        return int(self.lin.F.shape[1])

    def _pad(self, dF: Tensor) -> Tensor:
        """J_theta Fa = [J_theta F, 0]: the ones column does not depend on theta."""
        if self.sep.has_bias:
            return torch.cat([dF, torch.zeros(dF.shape[0], 1, dtype=dF.dtype, device=dF.device)], dim=1)
        return dF

    def gradient(self, for_products: bool = True) -> Tensor:
        """grad Phi_red = J_theta F^T (G W / n) + alpha_theta theta (one backward pass).

        ``for_products`` records the graph that Gauss-Newton products need (L-BFGS does not)."""
        if self.grad is None:
            dF = (self.G @ self.W / self.n)[:, : self.m]
            grad = self.lin.gradient(dF) if for_products else self.lin.vjp(dF)
            self.grad = grad.double() + self.alpha_theta * self.theta.double()
        return self.grad

    def dW(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(J_theta W v, J_theta Fa v): the implicit derivative of W(theta) in direction v."""
        dFa = self._pad(self.lin.jvp(v).double())
        P = self.problem
        rhs = (P.loss_hess(self.X, dFa @ self.W.T).T @ P.fa + self.G.T @ dFa) / self.n
        return -P.solve_hess(self.W, rhs), dFa

    def jvp(self, v: Tensor) -> Tensor:
        """J v for the outputs X(theta) = Fa(theta) W(theta)^T (n, t)."""
        return self._jvp_and_dW(v)[0]

    def _jvp_and_dW(self, v: Tensor) -> tuple[Tensor, Tensor]:
        dW, dFa = self.dW(v)
        return dFa @ self.W.T + self.problem.fa @ dW.T, dW

    def vjp(self, U: Tensor, V: Tensor | None = None) -> Tensor:
        """J^T U + J_theta W^T V (the adjoints of `jvp` and of `dW`) as a flat theta vector."""
        P = self.problem
        cot = U @ self.W
        cot_w = U.T @ P.fa if V is None else U.T @ P.fa + V
        gbar = -P.solve_hess(self.W, cot_w)
        cot = cot + (P.loss_hess(self.X, P.fa @ gbar.T) @ self.W + self.G @ gbar) / self.n
        return self.lin.vjp(cot[:, : self.m]).double()

    def gn_product(self, v: Tensor) -> Tensor:
        """Gauss-Newton product of Phi_red, the alpha_W/2 ||W(theta)||^2 term included:
        (J^T H_L J / n + alpha_W J_W^T J_W + alpha_theta I) v -- one jvp and one vjp (2 work units)."""
        Jv, dW = self._jvp_and_dW(v)
        alpha_w = self.problem.alpha
        return self.vjp(self.problem.loss_hess(self.X, Jv) / self.n, alpha_w * dW if alpha_w > 0 else None) + self.alpha_theta * v


@dataclass(frozen=True)
class TrustRegionSettings:
    max_iter: int = 50
    krylov_rank: int = 10  # r: Hessian products per outer iteration at most (gmres-subspace: m)
    radius: float | None = 1.0  # None: the full Gauss-Newton step's length (gmres-subspace) or 1
    solver: str = "steihaug"  # or "gmres-subspace"
    max_radius: float = 1e3
    eta: float = 1e-4  # accept a step when actual / predicted decrease > eta
    grad_tol: float = 1e-10
    inner_tol: float = 1e-10


@dataclass
class GNvproRecord:
    iteration: int
    work_units: float
    seconds: float
    phi: float
    grad_norm: float
    radius: float
    krylov: int
    accepted: bool
    predicted: float  # the model's decrease of Phi for the step tried
    actual: float  # Phi before - Phi at the trial point
    interior: bool  # the step was shorter than the radius (not cut by it)


Callback = Callable[[GNvproRecord, ReducedPoint], None]


def gnvpro(
    sep: Separable,
    x: Tensor,
    targets: Tensor,
    loss: str,
    alpha_theta: float,
    alpha_w: float,
    settings: TrustRegionSettings,
    *,
    work_units: float = 0.0,
    callback: Callback | None = None,
    progress: Progress | None = None,
) -> tuple[ReducedPoint, float]:
    """Minimise Phi_red over theta in place; returns the final point and the work units spent.

    ``callback(record, point)`` runs after every outer iteration (history, test metrics).
    """
    progress = silent_if_none(progress)
    start = time.perf_counter()

    def reduced() -> ReducedPoint:
        return ReducedPoint.at(sep, x, targets, loss, alpha_theta, alpha_w, settings.inner_tol)

    point = reduced()
    units = work_units + 1.0  # the forward pass
    radius = settings.radius
    basis: KrylovBasis | None = None
    for it in progress.track(range(1, settings.max_iter + 1), settings.max_iter, "gnvpro"):
        fresh = point.grad is None
        g = point.gradient()
        units += 1.0 if fresh else 0.0
        g_norm = float(g.norm())
        if g_norm <= settings.grad_tol:
            break
        if settings.solver == "steihaug":
            cg = steihaug_cg(point.gn_product, g, radius or 1.0, settings.krylov_rank)
            s, predicted, krylov = cg.step, cg.model_decrease, cg.iterations
        else:
            krylov = 0
            if basis is None:
                basis = KrylovBasis.build(point.gn_product, g, settings.krylov_rank)
                krylov = basis.products
            if radius is None:
                newton = basis.newton_norm()
                radius = newton if 0 < newton < math.inf else 1.0
            s, predicted = basis.step(radius)
        units += 2.0 * krylov
        sep.set_theta(point.theta + s)
        trial = reduced()
        units += 1.0
        actual = point.phi - trial.phi
        rho = actual / max(predicted, 1e-300)
        used = radius or 1.0
        accepted, radius = _update(settings.solver, rho, float(s.norm()), used, settings)
        if accepted:
            point, basis = trial, None
        else:
            sep.set_theta(point.theta)
        record = GNvproRecord(it, units, time.perf_counter() - start, point.phi, g_norm, radius, krylov, accepted, predicted, actual,
                              float(s.norm()) < 0.99 * used)  # fmt: skip
        progress.update(phi=point.phi, radius=radius)
        if callback is not None:
            callback(record, point)
        if radius < 1e-12:
            break
    sep.set_theta(point.theta)
    sep.set_W(point.W)
    return point, units


def _update(solver: str, rho: float, s_norm: float, radius: float, settings: TrustRegionSettings) -> tuple[bool, float]:
    """(accept?, new radius) from rho = actual / predicted decrease.

    steihaug: shrink to ||s|| / 4 below 1/4, double at the boundary above 3/4, accept above eta.
    gmres-subspace (the paper's thresholds 1e-4 / 0.1 / 0.75): reject and halve below 1e-4,
    accept and halve below 0.1, keep up to 0.75, above it grow x1.5 when the step hit the boundary.
    """
    at_boundary = s_norm >= 0.99 * radius
    if solver == "steihaug":
        if rho < 0.25:
            radius = 0.25 * s_norm
        elif rho > 0.75 and at_boundary:
            radius = min(2.0 * radius, settings.max_radius)
        return rho > settings.eta, radius
    if rho < settings.eta:
        return False, 0.5 * min(radius, s_norm)
    if rho < 0.1:
        return True, 0.5 * radius
    if rho > 0.75 and at_boundary:
        return True, min(1.5 * radius, settings.max_radius)
    return True, radius
