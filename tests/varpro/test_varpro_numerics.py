"""VarPro numerics in float64: inner optimality, reduced gradient, implicit J_theta W, trust region."""

from __future__ import annotations

import pytest
import torch

from odekit.methods.varpro.gnvpro import ReducedPoint, TrustRegionSettings, gnvpro
from odekit.methods.varpro.inner import InnerProblem, solve_inner
from odekit.methods.varpro.krylov import quadratic_model, steihaug_cg
from odekit.methods.varpro.separable import Separable
from odekit.models.antisym import ODENetAntisym, prolongate

ALPHA_THETA, ALPHA_W = 1e-3, 1e-3


def _net(in_features: int = 3, out: int = 2, width: int = 4, depth: int = 3, seed: int = 0) -> ODENetAntisym:
    torch.manual_seed(seed)
    return ODENetAntisym(in_features, out, width=width, depth=depth).double()


def _data(loss: str, n: int = 40, in_features: int = 3, out: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=torch.float64)
    if loss == "ls":
        c = torch.stack([torch.sin(x[:, 0]) + x[:, 1] * x[:, 2], torch.cos(x[:, 1])], dim=1)[:, :out]
    else:
        c = (x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.5).long()
    return x, c


def _phi(sep: Separable, x, c, loss: str, W: torch.Tensor) -> float:
    fa = sep.augment(sep.features(x).detach())
    theta = sep.theta_vector()
    return InnerProblem(fa, c, loss, ALPHA_W, sep.num_outputs).value(W) + 0.5 * ALPHA_THETA * float(theta @ theta)


@pytest.mark.parametrize("loss", ["ls", "ce"])
def test_inner_solve_is_optimal(loss: str) -> None:
    net = _net()
    sep = Separable(net)
    x, c = _data(loss)
    fa = sep.augment(sep.features(x).detach())
    problem = InnerProblem(fa, c, loss, ALPHA_W, 2)
    res = solve_inner(problem, tol=1e-11)
    assert float(problem.grad(res.W).norm()) < 1e-8
    # a perturbation of the optimum only raises Phi (strict convexity)
    dW = 1e-3 * torch.randn_like(res.W)
    assert problem.value(res.W + dW) > problem.value(res.W)


def test_ls_inner_matches_normal_equations_with_fewer_samples_than_features() -> None:
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(5, 9, generator=g, dtype=torch.float64)
    c = torch.randn(5, 2, generator=g, dtype=torch.float64)
    problem = InnerProblem(fa, c, "ls", 1e-2, 2)
    W = solve_inner(problem).W
    A = fa.T @ fa / 5 + 1e-2 * torch.eye(9, dtype=torch.float64)
    expected = torch.linalg.solve(A, fa.T @ c / 5).T
    assert torch.allclose(W, expected, atol=1e-12)


@pytest.mark.parametrize("loss", ["ls", "ce"])
def test_reduced_gradient_equals_full_gradient_and_finite_differences(loss: str) -> None:
    net = _net()
    sep = Separable(net)
    x, c = _data(loss)
    point = ReducedPoint.at(sep, x, c, loss, ALPHA_THETA, ALPHA_W, inner_tol=1e-12)
    g_red = point.gradient()
    # grad_theta Phi(W, theta) at the fixed W = W(theta), by plain autograd
    sep.set_W(point.W)
    out = net(x)
    data = 0.5 * ((out - c) ** 2).sum() / len(x) if loss == "ls" else torch.nn.functional.cross_entropy(out, c)
    theta_sq = sum((p * p).sum() for p in sep.theta)
    full = torch.autograd.grad(data + 0.5 * ALPHA_THETA * theta_sq, sep.theta)
    g_full = torch.cat([g.reshape(-1) for g in full])
    assert torch.allclose(g_red, g_full, rtol=1e-9, atol=1e-12)
    # central differences of Phi_red along random directions
    theta0 = sep.theta_vector()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(theta0.shape, generator=gen, dtype=torch.float64)
        v /= v.norm()
        h = 1e-5
        values = []
        for sign in (1, -1):
            sep.set_theta(theta0 + sign * h * v)
            values.append(ReducedPoint.at(sep, x, c, loss, ALPHA_THETA, ALPHA_W, inner_tol=1e-13).phi)
        sep.set_theta(theta0)
        fd = (values[0] - values[1]) / (2 * h)
        assert abs(fd - float(g_red @ v)) < 1e-7 * max(1.0, abs(fd))


@pytest.mark.parametrize("loss", ["ls", "ce"])
def test_implicit_jacobian_of_w_matches_finite_differences(loss: str) -> None:
    net = _net()
    sep = Separable(net)
    x, c = _data(loss)
    point = ReducedPoint.at(sep, x, c, loss, ALPHA_THETA, ALPHA_W, inner_tol=1e-13)
    point.gradient()
    theta0 = sep.theta_vector()
    v = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dW, _ = point.dW(v)
    h = 1e-6
    Ws = []
    for sign in (1, -1):
        sep.set_theta(theta0 + sign * h * v)
        Ws.append(ReducedPoint.at(sep, x, c, loss, ALPHA_THETA, ALPHA_W, inner_tol=1e-13).W)
    sep.set_theta(theta0)
    fd = (Ws[0] - Ws[1]) / (2 * h)
    assert float((fd - dW).norm()) < 1e-6 * max(1.0, float(fd.norm()))
    # and J^T is the adjoint of J: <J v, U> = <v, J^T U>
    U = torch.randn(point.X.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    lhs = float((point.jvp(v) * U).sum())
    rhs = float(v @ point.vjp(U))
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))
    V = torch.randn(dW.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lhs_w = float((dW * V).sum())
    rhs_w = float(v @ point.vjp(torch.zeros_like(U), V))
    assert abs(lhs_w - rhs_w) < 1e-10 * max(1.0, abs(lhs_w))


def test_steihaug_step_decreases_model_and_respects_radius() -> None:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    eig = torch.linspace(-1.0, 10.0, 30, dtype=torch.float64)  # indefinite: negative curvature exists
    H = Q @ torch.diag(eig) @ Q.T
    grad = torch.randn(30, generator=g, dtype=torch.float64)
    for radius in (1e-3, 0.1, 1.0, 100.0):
        res = steihaug_cg(lambda v: H @ v, grad, radius, max_iter=50)
        assert float(res.step.norm()) <= radius * (1 + 1e-12)
        m = quadratic_model(grad, H @ res.step, res.step)
        assert m < 0 and abs(-m - res.model_decrease) < 1e-10 * max(1.0, abs(m))
    # positive definite and a big radius: CG converges to the Newton step
    Hpd = Q @ torch.diag(torch.linspace(1.0, 10.0, 30, dtype=torch.float64)) @ Q.T
    res = steihaug_cg(lambda v: Hpd @ v, grad, 1e6, max_iter=100, rtol=1e-12)
    assert torch.allclose(res.step, -torch.linalg.solve(Hpd, grad), atol=1e-9)


def test_antisymmetric_operator_eigenvalues_have_real_part_minus_gamma() -> None:
    net = _net(width=6)
    func = net.ode.func
    for t in (0.0, 0.37, 1.0):
        A, _ = func.operator(t)
        eig = torch.linalg.eigvals(A.detach())
        assert torch.allclose(eig.real, torch.full_like(eig.real, -func.gamma), atol=1e-12)


def test_prolongation_leaves_outputs_unchanged() -> None:
    net = _net(depth=4, width=5)
    with torch.no_grad():
        for p in net.ode.func.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, _ = _data("ls")
    fine = prolongate(net)
    assert fine.ode.func.depth == 8 and fine.ode.config.steps == 4
    with torch.no_grad():
        assert float((fine(x) - net(x)).abs().max()) < 1e-6
        # refining the RK4 grid too: the change is RK4's O(h^4) difference, shrinking ~16x per halving
        steps8 = prolongate(net, refine_steps=True)
        steps16 = prolongate(steps8, refine_steps=True)
        d1 = float((steps8(x) - net(x)).abs().max())
        d2 = float((steps16(x) - steps8(x)).abs().max())
        assert d2 < d1 / 8


def _teacher_student(perturbation: float, opening: bool, n: int = 60):
    """Targets made by a teacher of the same architecture: Phi_red's minimum is 0."""
    teacher = _net(width=3, depth=2, seed=7)
    x, _ = _data("ls", n=n)
    with torch.no_grad():
        c = teacher(x)
    student = _net(width=3, depth=2, seed=7)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.ode.func.parameters():
            p.add_(perturbation * torch.randn_like(p))
        if opening:
            student.opening.weight.add_(perturbation * torch.randn_like(student.opening.weight))
    return student, x, c


@pytest.mark.parametrize(
    ("perturbation", "opening", "min_start", "iters"),
    [(0.05, False, 1e-6, 40), pytest.param(0.3, True, 1e-3, 60, marks=pytest.mark.slow)],
)
def test_gnvpro_converges_on_separable_toy_with_known_optimum(perturbation: float, opening: bool, min_start: float, iters: int) -> None:
    student, x, c = _teacher_student(perturbation, opening)
    sep = Separable(student)
    start = ReducedPoint.at(sep, x, c, "ls", 0.0, 0.0).phi
    point, units = gnvpro(sep, x, c, "ls", 0.0, 0.0, TrustRegionSettings(max_iter=iters, krylov_rank=40, radius=0.1))
    assert start > min_start
    assert point.phi < 1e-12 and units > 0
    with torch.no_grad():
        assert float((student(x) - c).abs().max()) < 1e-5
