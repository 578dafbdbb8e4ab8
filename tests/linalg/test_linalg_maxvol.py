"""Defining properties of square and rectangular maxvol, over random shapes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odekit.errors import NumericalError, UsageError
from odekit.linalg import maxvol, maxvol_coefficients, rect_maxvol, rect_maxvol_error_factor


def _tall(n: int, r: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, r, generator=g, dtype=torch.float64)
    a = a * torch.logspace(0, -2, r, dtype=torch.float64)  # uneven column scales
    return a.to(dtype)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 80), r=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_maxvol_dominance(n, r, seed):
    r = min(r, n)
    a = _tall(n, r, seed)
    tol = 1.05
    idx = maxvol(a, tol=tol, max_iters=500)
    assert idx.shape == (r,)
    assert len(set(idx.tolist())) == r
    c = a @ torch.linalg.inv(a[idx])
    assert float(c.abs().max()) <= tol + 1e-8
    assert torch.allclose(c[idx], torch.eye(r, dtype=torch.float64), atol=1e-8)


def test_maxvol_batched_matches_single():
    a = torch.stack([_tall(40, 5, s) for s in range(4)])
    idx = maxvol(a, tol=1.01, max_iters=500)
    assert idx.shape == (4, 5)
    for b in range(4):
        c = a[b] @ torch.linalg.inv(a[b][idx[b]])
        assert float(c.abs().max()) <= 1.01 + 1e-8


def test_maxvol_volume_not_worse_than_lu_start_and_float32():
    a = _tall(200, 8, 7, dtype=torch.float32)
    idx = maxvol(a, tol=1.0 + 1e-6, max_iters=1000)
    vol = abs(float(torch.linalg.det(a[idx].double())))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # random subsets never beat a dominant submatrix by much
        rnd = torch.randperm(200, generator=g)[:8]
        assert abs(float(torch.linalg.det(a[rnd].double()))) <= vol * (1 + 1e-5)


def test_maxvol_rank_deficient_and_bad_shapes():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # exactly singular pivots must give a NumericalError, not a crash
        a = torch.randn(20, 3, generator=g, dtype=torch.float64)
        a[:, 2] = a[:, 0]
        with pytest.raises(NumericalError):
            maxvol(a)
        with pytest.raises(NumericalError):
            rect_maxvol(a)
    with pytest.raises(UsageError):
        maxvol(torch.randn(2, 3))
    with pytest.raises(UsageError):
        maxvol(torch.randn(5, 3), tol=0.5)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 120),
    r=st.integers(1, 10),
    seed=st.integers(0, 10_000),
    tol=st.sampled_from([1.0, 1.2, 2.0]),
)
def test_rect_maxvol_properties(n, r, seed, tol):
    r = min(r, n)
    a = _tall(n, r, seed)
    idx, c = rect_maxvol(a, tol=tol, return_coefficients=True)
    p = idx.numel()
    assert r <= p <= min(2 * r, n)
    assert len(set(idx.tolist())) == p
    # the returned coefficients are A A[S]^+
    assert torch.allclose(c, maxvol_coefficients(a, idx), atol=1e-7)
    norms = c.norm(dim=1)
    # defining property: either every row norm is <= tol, or P hit its maximum
    assert float(norms.max()) <= tol + 1e-8 or p == min(2 * r, n)
    # ||A A_S^+||_2 = ||C||_2 is within eq. 5.19's factor whenever the tolerance was met
    if float(norms.max()) <= 1.0 + 1e-8:
        assert float(torch.linalg.matrix_norm(c, ord=2)) <= rect_maxvol_error_factor(n, p, r) + 1e-8


@settings(max_examples=20, deadline=None)
@given(n=st.integers(10, 100), r=st.integers(1, 8), seed=st.integers(0, 1000))
def test_rect_maxvol_fixed_size_and_error_factor(n, r, seed):
    r = min(r, n // 2)
    a = torch.linalg.qr(_tall(n, r, seed)).Q  # orthonormal basis, like V_k
    p = min(n, math.ceil(1.5 * r))
    idx = rect_maxvol(a, min_rows=p, max_rows=p)
    assert idx.numel() == p
    amp = float(torch.linalg.matrix_norm(a @ torch.linalg.pinv(a[idx]), ord=2))
    # rows are an orthonormal basis, so ||V (S V)^+|| = 1 / sigma_min(S V) >= 1
    assert amp >= 1 - 1e-9
    # coefficient rows start with |C_ij| <= 1 (square maxvol) and adding rows only shrinks their
    # norms, so ||C||_2 <= ||C||_F <= sqrt(n r)
    assert amp <= math.sqrt(n * r) * (1 + 1e-6)


def test_rect_maxvol_batched_and_validation():
    a = torch.stack([_tall(30, 4, s) for s in range(3)])
    idx = rect_maxvol(a, min_rows=6, max_rows=6)
    assert idx.shape == (3, 6)
    with pytest.raises(UsageError):
        rect_maxvol(_tall(30, 4, 0), min_rows=3)
    with pytest.raises(UsageError):
        rect_maxvol(_tall(30, 4, 0), max_rows=31)
    assert rect_maxvol_error_factor(100, 15, 10) == pytest.approx(math.sqrt(1 + 85 * 10 / 6))
