"""Orthonormal Hermite basis and least-squares PCE (thesis eq. 6.18-6.20)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odekit.errors import UsageError
from odekit.methods.pce import PCELayer, basis_size, fit_pce, hermite_orthonormal, multi_indices


def _gauss_hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights integrating against the standard normal density exactly up to degree 2n-1."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(x, dtype=torch.float64), torch.tensor(w / math.sqrt(2 * math.pi), dtype=torch.float64)


def test_univariate_hermite_orthonormal_under_gaussian_measure() -> None:
    x, w = _gauss_hermite(20)
    h = hermite_orthonormal(x, 8)  # (20, 9)
    gram = h.T @ (w.unsqueeze(1) * h)
    assert torch.allclose(gram, torch.eye(9, dtype=torch.float64), atol=1e-12)


def test_hermite_matches_probabilists_recurrence() -> None:
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    h = hermite_orthonormal(z, 4)
    he = [torch.ones_like(z), z, z**2 - 1, z**3 - 3 * z, z**4 - 6 * z**2 + 3]
    for k in range(5):
        assert torch.allclose(h[:, k], he[k] / math.sqrt(math.factorial(k)), atol=1e-12)


def test_multivariate_basis_orthonormal_by_tensor_quadrature() -> None:
    x, w = _gauss_hermite(6)  # exact for products up to degree 11 per axis
    grid = torch.cartesian_prod(x, x, x)
    weights = torch.cartesian_prod(w, w, w).prod(dim=1)
    layer = PCELayer(3, 3, 1).double()
    phi = layer.basis(grid)
    gram = phi.T @ (weights.unsqueeze(1) * phi)
    assert phi.shape[1] == basis_size(3, 3) == 20
    assert torch.allclose(gram, torch.eye(20, dtype=torch.float64), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 6), degree=st.integers(1, 4), seed=st.integers(0, 1000))
def test_basis_is_every_multi_index_up_to_total_degree(dim: int, degree: int, seed: int) -> None:
    alphas = multi_indices(dim, degree)
    assert len(alphas) == len(set(alphas)) == basis_size(dim, degree) == math.comb(dim + degree, degree)
    assert all(sum(a) <= degree for a in alphas)
    z = torch.randn(7, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layer = PCELayer(dim, degree, 2).double()
    h = hermite_orthonormal(z, degree)
    explicit = torch.stack(
        [torch.stack([h[:, j, a[j]] for j in range(dim)], 1).prod(1) for a in alphas], dim=1
    )
    assert torch.allclose(layer.basis(z), explicit, atol=1e-12)


def test_pce_recovers_an_exact_polynomial() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 3, generator=g, dtype=torch.float64)
    # y = 3 + z1 - 2 z1 z2 + 0.5 z3^2 - z2^3 (degree 3, two outputs)
    y1 = 3 + z[:, 0] - 2 * z[:, 0] * z[:, 1] + 0.5 * z[:, 2] ** 2 - z[:, 1] ** 3
    y = torch.stack([y1, -y1 + 1], 1)
    layer = PCELayer(3, 3, 2).double()
    fit = fit_pce(layer, [(z[:200], y[:200]), (z[200:], y[200:])])
    assert fit.residual < 1e-12 and fit.n_samples == 400 and fit.warnings == []  # mean squared error at float64 round-off (BLAS-dependent)
    z_new = torch.randn(50, 3, generator=g, dtype=torch.float64)
    want = 3 + z_new[:, 0] - 2 * z_new[:, 0] * z_new[:, 1] + 0.5 * z_new[:, 2] ** 2 - z_new[:, 1] ** 3
    with torch.no_grad():
        got = layer(z_new)
    assert torch.allclose(got[:, 0], want, atol=1e-9)
    # coefficient of the constant: E[y] = 3 + 0.5 E[z3^2] = 3.5; of He_1(z1) = z1: 1
    assert abs(float(layer.linear.weight[0, 0].detach()) - 3.5) < 1e-9
    assert abs(float(layer.linear.weight[0, 1].detach()) - 1.0) < 1e-9


def test_too_few_samples_warns_and_gives_minimum_norm_solution() -> None:
    g = torch.Generator().manual_seed(1)
    layer = PCELayer(6, 2, 1).double()  # 28 basis functions
    z = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    fit = fit_pce(layer, [(z, y)])
    assert len(fit.warnings) == 1 and "56" in fit.warnings[0]
    z = torch.randn(20, 6, generator=g, dtype=torch.float64)  # fewer samples than basis functions
    fit = fit_pce(layer, [(z, y[:20])])
    assert fit.rank_deficient and fit.residual < 1e-12  # interpolates
    assert torch.isfinite(layer.linear.weight).all()


def test_ridge_shrinks_coefficients() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(300, 2, generator=g, dtype=torch.float64)
    y = (z[:, :1] * 2.0) + 0.1 * torch.randn(300, 1, generator=g, dtype=torch.float64)
    plain, ridged = PCELayer(2, 2, 1).double(), PCELayer(2, 2, 1).double()
    fit_pce(plain, [(z, y)])
    fit_pce(ridged, [(z, y)], ridge=1.0)
    assert ridged.linear.weight.norm() < plain.linear.weight.norm()


def test_bad_settings_raise_usage_errors() -> None:
    with pytest.raises(UsageError):
        PCELayer(3, 0, 2)
    with pytest.raises(UsageError):
        PCELayer(200, 3, 2)  # 1.4 M basis functions
    with pytest.raises(UsageError):
        fit_pce(PCELayer(2, 2, 1), [], ridge=-1.0)
