"""Frequent directions, count sketch and streaming SVD against exact dense computations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odekit.errors import NumericalError, UsageError
from odekit.linalg import (
    CountSketch,
    FrequentDirections,
    StreamingSVD,
    subspace_sin_theta,
)

TOL = 1e-9


def _matrix(n: int, d: int, rank: int | None, seed: int, noise: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        a = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, d, generator=g, dtype=torch.float64
        )
        a = a + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    # uneven row scales make the stream harder than iid rows
    scales = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 + 0.1
    return a * scales


def _feed(fd, a: torch.Tensor, batch: int) -> None:
    for start in range(0, a.shape[0], batch):
        fd.update(a[start : start + batch])


def _cov_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.T @ a - b.T @ b, ord=2))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 120),
    d=st.integers(1, 40),
    ell=st.integers(2, 16),
    batch=st.integers(1, 50),
    low_rank=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 10_000),
    shrink=st.sampled_from(["svd", "gram"]),
)
def test_fd_covariance_error_within_bounds(n, d, ell, batch, low_rank, seed, shrink):
    a = _matrix(n, d, low_rank, seed, noise=1e-3)
    fd = FrequentDirections(d, ell, shrink=shrink)
    _feed(fd, a, batch)
    b = fd.sketch
    assert b.shape == (ell, d)
    err = _cov_err(a, b)
    delta = fd.covariance_error_bound()
    scale = float(a.pow(2).sum()) + 1.0
    assert err <= delta + TOL * scale
    # B^T B <= A^T A in the Loewner order
    assert float(torch.linalg.eigvalsh(a.T @ a - b.T @ b).min()) >= -TOL * scale
    s = torch.linalg.svdvals(a)
    for k in range(min(ell, s.numel() + 1)):
        tail = float(s[k:].pow(2).sum())
        assert delta <= fd.covariance_error_bound(k, tail) + TOL * scale
    assert fd.n_rows == n
    assert abs(fd.frobenius_sq - float(a.pow(2).sum())) <= 1e-9 * scale


def test_fd_first_batch_enters_and_exact_when_rank_fits():
    a = _matrix(50, 30, rank=4, seed=1)
    fd = FrequentDirections(30, 8)
    fd.update(a[:10])  # first batch alone must already be in the sketch
    b = fd.sketch
    assert _cov_err(a[:10], b) < 1e-9 * float(a[:10].pow(2).sum())
    fd.update(a[10:])
    assert fd.covariance_error_bound() < 1e-8 * float(a.pow(2).sum())
    assert _cov_err(a, fd.sketch) < 1e-8 * float(a.pow(2).sum())


@settings(max_examples=10, deadline=None)
@given(
    shards=st.integers(2, 4),
    n=st.integers(10, 60),
    d=st.integers(3, 30),
    ell=st.integers(2, 10),
    seed=st.integers(0, 1000),
)
def test_fd_merge_preserves_bound(shards, n, d, ell, seed):
    parts = [_matrix(n, d, None, seed + i) for i in range(shards)]
    a = torch.cat(parts)
    sketches = []
    for p in parts:
        fd = FrequentDirections(d, ell)
        _feed(fd, p, 7)
        sketches.append(fd)
    merged = sketches[0]
    for other in sketches[1:]:
        merged.merge(other)
    scale = float(a.pow(2).sum())
    err = _cov_err(a, merged.sketch)
    assert err <= merged.covariance_error_bound() + 1e-9 * scale
    s = torch.linalg.svdvals(a)
    for k in range(min(ell, s.numel())):
        assert (
            merged.covariance_error_bound() <= float(s[k:].pow(2).sum()) / (ell - k) + 1e-9 * scale
        )
    assert merged.n_rows == a.shape[0]


def test_fd_validation():
    with pytest.raises(UsageError):
        FrequentDirections(0, 4)
    fd = FrequentDirections(5, 3)
    with pytest.raises(UsageError):
        fd.update(torch.ones(2, 4))
    with pytest.raises(NumericalError):
        fd.update(torch.tensor([[float("nan")] * 5]))
    with pytest.raises(UsageError):
        fd.merge(FrequentDirections(5, 4))
    fd.update(torch.randn(10, 5, dtype=torch.float64))
    with pytest.raises(NumericalError):
        fd.right_singular(4)
    s, v = fd.right_singular(2)
    assert v.shape == (5, 2) and s.shape == (2,)
    assert torch.allclose(v.T @ v, torch.eye(2, dtype=torch.float64), atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(40, 150),
    d=st.integers(10, 60),
    rank=st.integers(1, 5),
    seed=st.integers(0, 1000),
    noise=st.sampled_from([0.0, 1e-3, 1e-2]),
    shrink=st.sampled_from(["svd", "gram"]),
)
def test_streaming_svd_subspace_error_within_certified_bound(n, d, rank, seed, noise, shrink):
    a = _matrix(n, d, rank, seed, noise=noise)
    svd = StreamingSVD(d, rank=rank, sketch_size=2 * rank + 6, shrink=shrink)
    _feed(svd, a, 16)
    res = svd.result()
    _, s_exact, vh = torch.linalg.svd(a, full_matrices=False)
    sin = subspace_sin_theta(vh[:rank].T, res.V)
    assert sin <= res.subspace_error_bound + 1e-7
    # singular values: sigma_i(A)^2 - delta <= sigma_i(B)^2 <= sigma_i(A)^2
    sq_a, sq_b = s_exact[:rank].pow(2), res.singular_values.pow(2)
    scale = float(a.pow(2).sum())
    assert bool((sq_b <= sq_a + 1e-9 * scale).all())
    assert bool((sq_b >= sq_a - res.covariance_error - 1e-9 * scale).all())
    if noise == 0.0:
        assert sin < 1e-6


def test_streaming_svd_errors():
    svd = StreamingSVD(10, rank=3)
    with pytest.raises(NumericalError):
        svd.result()
    svd.update(torch.randn(2, 10, dtype=torch.float64))
    with pytest.raises(NumericalError, match="samples"):
        svd.result()
    with pytest.raises(UsageError):
        StreamingSVD(10, rank=8, sketch_size=4)


def test_count_sketch_recovers_low_rank_subspace_and_merges():
    a = _matrix(400, 50, rank=3, seed=3)
    cs1, cs2 = CountSketch(50, 40, seed=1), CountSketch(50, 40, seed=2)
    cs1.update(a[:200])
    cs2.update(a[200:])
    cs1.merge(cs2)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    _, v = cs1.right_singular(3)
    assert subspace_sin_theta(vh[:3].T, v) < 1e-8  # exact: S A has the same row space


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fd_on_cuda_matches_cpu():
    a = _matrix(100, 20, None, 5)
    cpu, gpu = FrequentDirections(20, 6), FrequentDirections(20, 6, device="cuda")
    _feed(cpu, a, 13)
    _feed(gpu, a, 13)
    assert torch.allclose(
        cpu.sketch.T @ cpu.sketch, gpu.sketch.cpu().T @ gpu.sketch.cpu(), atol=1e-8
    )
