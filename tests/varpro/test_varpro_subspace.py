"""The paper's GNvpro step (gmres-subspace), L-BFGS on Phi_red, the diagnosis and cdr-transient."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from odekit.io.cdr_transient import generate_cdr_transient, load_cdr_transient
from odekit.methods.varpro.diagnosis import diagnose
from odekit.methods.varpro.gnvpro import ReducedPoint, TrustRegionSettings, gnvpro
from odekit.methods.varpro.lbfgs import reduced_lbfgs
from odekit.methods.varpro.separable import Separable
from odekit.methods.varpro.subspace import KrylovBasis, trust_region_exact
from odekit.models.antisym import ODENetAntisym


def _sym(n: int, eig: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(eig) @ Q.T


def _kkt(H: torch.Tensor, g: torch.Tensor, s: torch.Tensor, radius: float) -> float:
    """Moré-Sorensen optimality: (H + mu I) s = -g, mu >= 0, mu (radius - ||s||) = 0, H + mu I >= 0."""
    n = len(g)
    on_boundary = abs(float(s.norm()) - radius) <= 1e-8 * radius
    mu = float(-(s @ (H @ s + g)) / (s @ s)) if on_boundary else 0.0
    residual = float((H @ s + mu * s + g).norm())
    assert float(s.norm()) <= radius * (1 + 1e-10) and mu >= -1e-9
    assert float(torch.linalg.eigvalsh(H + mu * torch.eye(n, dtype=H.dtype))[0]) >= -1e-9
    return residual


@pytest.mark.parametrize("case", ["definite", "indefinite", "hard"])
def test_exact_trust_region_step_meets_the_optimality_conditions(case: str) -> None:
    n = 8
    eig = {"definite": torch.linspace(0.5, 9.0, n), "indefinite": torch.linspace(-2.0, 6.0, n),
           "hard": torch.linspace(-1.0, 5.0, n)}[case].double()  # fmt: skip
    H = _sym(n, eig, 0)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if case == "hard":  # g orthogonal to the lowest eigenvector: the hard case for a large radius
        v = torch.linalg.eigh(H)[1][:, 0]
        g = g - (g @ v) * v
    for radius in (1e-3, 0.3, 3.0, 100.0):
        s = trust_region_exact(H, g, radius)
        assert _kkt(H, g, s, radius) < 1e-8 * max(1.0, float(g.norm()))
    # brute force on the boundary and inside: nothing beats the exact step
    model = lambda s: float(g @ s + 0.5 * s @ H @ s)  # noqa: E731
    s = trust_region_exact(H, g, 0.7)
    trials = torch.randn(4000, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    trials = 0.7 * trials / trials.norm(dim=1, keepdim=True) * torch.rand(4000, 1, generator=torch.Generator().manual_seed(3)).double() ** 0.1
    assert all(model(t) >= model(s) - 1e-12 for t in trials)


def test_subspace_step_with_a_full_basis_equals_the_dense_exact_step() -> None:
    n = 12
    H = _sym(n, torch.linspace(0.01, 20.0, n).double(), 4)
    g = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    basis = KrylovBasis.build(lambda v: H @ v, g, m=n)
    assert basis.products == n
    assert float((basis.Q.T @ basis.Q - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-10
    newton = -torch.linalg.solve(H, g)
    assert basis.newton_norm() == pytest.approx(float(newton.norm()), rel=1e-8)
    for radius in (0.05, 1.0, float(newton.norm()) * 2):
        s, predicted = basis.step(radius)
        dense = trust_region_exact(H, g, radius)
        assert torch.allclose(s, dense, atol=1e-8 * max(1.0, float(dense.norm())))
        assert predicted == pytest.approx(-float(g @ s + 0.5 * s @ H @ s), rel=1e-9)
    # a smaller basis: the step lowers the model, stays in the ball and the prediction is exact
    small = KrylovBasis.build(lambda v: H @ v, g, m=4)
    s, predicted = small.step(0.5)
    assert float(s.norm()) <= 0.5 * (1 + 1e-10) and predicted > 0
    assert predicted == pytest.approx(-float(g @ s + 0.5 * s @ H @ s), rel=1e-9)


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    teacher = ODENetAntisym(3, 2, width=3, depth=2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        c = teacher(x)
        student = ODENetAntisym(3, 2, width=3, depth=2).double()
        student.load_state_dict(teacher.state_dict())
        for p in student.ode.func.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return student, x, c


def test_gmres_subspace_gnvpro_converges_and_reuses_its_basis() -> None:
    student, x, c = _toy()
    sep = Separable(student)
    start = ReducedPoint.at(sep, x, c, "ls", 0.0, 0.0).phi
    records = []
    settings = TrustRegionSettings(max_iter=30, krylov_rank=20, radius=None, solver="gmres-subspace")
    point, units = gnvpro(sep, x, c, "ls", 0.0, 0.0, settings, callback=lambda r, p: records.append(r))
    assert start > 1e-6 and point.phi < 1e-6 * start
    rejected = [r for r in records if not r.accepted]
    assert all(r.krylov == 0 for r in records[1:] if not records[records.index(r) - 1].accepted)  # basis reused
    assert units == pytest.approx(1 + sum(1 + 2 * r.krylov for r in records) + sum(1 for r in records if r.krylov))
    assert len(rejected) < len(records)


def test_lbfgs_on_the_reduced_objective_lowers_phi_and_counts_two_units_per_evaluation() -> None:
    student, x, c = _toy()
    sep = Separable(student)
    start = ReducedPoint.at(sep, x, c, "ls", 0.0, 1e-8).phi
    records = []
    point, units = reduced_lbfgs(sep, x, c, "ls", 0.0, 1e-8, iters=30, callback=lambda r, p: records.append(r))
    assert point.phi < 0.1 * start
    assert units == 2 * records[-1].evaluations and records[-1].evaluations <= math.ceil(1.25 * 30)
    assert all(b.phi <= a.phi for a, b in itertools.pairwise(records))  # line search: monotone


def test_diagnosis_flags_poor_models() -> None:
    def rows(ratio: float, late: float | None = None, residual: float = 0.01) -> list[dict[str, float]]:
        late = ratio if late is None else late
        out = [{"phi_before": 1.0, "predicted_decrease": 0.2, "actual_decrease": r * 0.2, "train_rel_error": residual}
               for r in [ratio] * 6 + [late] * 6]  # fmt: skip
        return out

    assert diagnose(rows(1.0)).verdict == "good"
    assert diagnose(rows(0.1)).verdict == "mispredicts"
    assert diagnose(rows(1.0, late=0.3)).verdict == "mispredicts"  # right early, wrong near the minimum
    assert diagnose(rows(1.0, residual=0.2)).verdict == "large-residual"
    assert "poor model" in diagnose(rows(1.0, residual=0.2)).line and "20.0%" in diagnose(rows(1.0, residual=0.2)).line
    assert diagnose([]).verdict == "no-steps"


def test_cdr_transient_is_seeded_cached_and_split_like_the_paper(tmp_path) -> None:
    y, c = generate_cdr_transient(8, grid=8, seed=2)
    assert y.shape == (8, 55) and c.shape == (8, 72) and np.all(c >= 0)
    assert np.array_equal(c, generate_cdr_transient(8, grid=8, seed=2)[1])
    assert np.all(c.reshape(8, 12, 6)[:, -1].sum(1) > c.reshape(8, 12, 6)[:, 0].sum(1))  # u(0) = 0, the source fills in
    data = load_cdr_transient(40, grid=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("cdr-transient-*.npz"))) == 1
    assert data.x_train.shape == (20, 55) and data.x_test.shape == (10, 55)
    assert data.target_mean == [0.0] * 72 and data.target_std == [1.0] * 72  # raw targets
