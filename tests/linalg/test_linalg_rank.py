"""Rank rules and active-subspace helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odekit.errors import NumericalError, UsageError
from odekit.linalg import (
    RANK_RULES,
    FrequentDirections,
    RankContext,
    active_count,
    dominant_direction,
    energy_rank,
    parse_rank_spec,
    select_rank,
    vbmf_rank,
)


def _low_rank_plus_noise(n, d, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(30, 10, rank, dtype=torch.float64) * math.sqrt(n)
    return (u * s) @ v.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rank,n,d,seed", [(5, 300, 120, 0), (12, 500, 200, 1), (3, 150, 400, 2)])
def test_vbmf_recovers_rank_of_low_rank_plus_noise(rank, n, d, seed):
    a = _low_rank_plus_noise(n, d, rank, noise=1.0, seed=seed)
    s = torch.linalg.svdvals(a)
    assert vbmf_rank(s, n, d) == rank
    # from a sketch: top singular values plus the total energy
    fd = FrequentDirections(d, 4 * rank)
    for i in range(0, n, 64):
        fd.update(a[i : i + 64])
    ctx = RankContext(fd.singular_values(), n_samples=n, dim=d, total_energy=fd.frobenius_sq)
    assert select_rank("vbmf", ctx) == rank


def test_energy_factor_and_fixed_rules():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    total = float(s.pow(2).sum())  # 14.25
    ctx = RankContext(s, n_samples=100, dim=4)
    assert select_rank("energy:0.6", ctx) == 1  # 9 / 14.25 = 0.63
    assert select_rank("energy:0.9", ctx) == 2  # 13 / 14.25 = 0.91
    assert select_rank("energy:1.0", ctx) == 4
    assert energy_rank(s, 0.9, total_energy=total * 2) == 4  # unseen energy counts
    assert select_rank("factor:2", RankContext(s, 100, 4)) == 2
    assert select_rank("factor:4", RankContext(s, 100, 4)) == 1
    assert select_rank("3", ctx) == 3
    assert select_rank(2, ctx) == 2
    assert str(parse_rank_spec("energy:0.99")) == "energy:0.99"
    assert set(RANK_RULES.names()) >= {"vbmf", "energy", "factor"}


def test_impossible_ranks_are_clear_errors():
    s = torch.tensor([3.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(NumericalError, match="samples"):
        select_rank(10, RankContext(s, n_samples=5, dim=40))
    with pytest.raises(NumericalError, match="layer dimension"):
        select_rank(10, RankContext(s, n_samples=50, dim=4))
    with pytest.raises(NumericalError, match="data allows"):
        select_rank(3, RankContext(s, n_samples=50, dim=4))
    with pytest.raises(NumericalError, match="sketch"):
        select_rank(3, RankContext(torch.ones(4), n_samples=50, dim=40), max_rank=2)
    for bad in ("energy", "energy:1.5", "factor:0.5", "bogus", "0", "energy:x"):
        with pytest.raises(UsageError):
            parse_rank_spec(bad)


def test_active_count_equations():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # s^2 = 16, 4, 1, 1 (sum 22)
    # eq. 6.17: sqrt(cum / 22) >= 1 - eps
    assert active_count(s, 0.05) == 2  # sqrt(20/22) = 0.953
    assert active_count(s, 0.01) == 4  # sqrt(21/22) = 0.977 < 0.99
    # eq. 6.12: cum / 22 >= 1 - eps
    assert active_count(s, 0.05, form="eq6.12") == 3  # 21/22 = 0.9545 >= 0.95
    assert active_count(s, 0.1, form="eq6.12") == 2  # 20/22 = 0.909
    assert active_count(torch.tensor([1.0, 2.0]), 0.0) == 2
    with pytest.raises(UsageError):
        active_count(s, 1.5)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 30), d=st.integers(1, 40), seed=st.integers(0, 1000))
def test_dominant_direction_is_top_eigenvector(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(b, d, generator=g, dtype=torch.float64)
    grads[:, 0] += 5.0  # a clear dominant direction
    v = dominant_direction(grads)
    cov = grads.T @ grads / b
    evals, evecs = torch.linalg.eigh(cov)
    assert abs(float(v.norm()) - 1.0) < 1e-12
    assert float(v @ cov @ v) == pytest.approx(float(evals[-1]), rel=1e-9)
    assert abs(abs(float(v @ evecs[:, -1])) - 1.0) < 1e-6
    vp = dominant_direction(grads, iters=500)
    assert float(vp @ cov @ vp) == pytest.approx(float(evals[-1]), rel=1e-6)
