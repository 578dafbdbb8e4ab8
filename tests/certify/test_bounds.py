"""Layer bounds: Gram bound >= exact spectral norm >= power iteration (exact from the dense
operator), circular padding matches the FFT value, scaling, pooling and activation constants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from odekit.linalg.lipschitz import (
    ACTIVATION_LIPSCHITZ,
    ConvSpec,
    circular_conv_norm,
    conv_bound,
    conv_upper_bound,
    dense_conv_matrix,
    gram_bound,
    matrix_bound,
)
from odekit.methods.certify.ops import adaptive, pooling

CASES = [  # c_out, c_in, k, n, stride, padding, dilation, groups, mode
    (4, 3, 3, 7, 1, 1, 1, 1, "zeros"),
    (6, 4, 3, 7, 2, 1, 1, 2, "zeros"),
    (4, 4, 5, 9, 3, 2, 1, 4, "zeros"),
    (4, 4, 3, 8, 1, 2, 2, 1, "zeros"),
    (4, 2, 3, 9, 2, 2, 2, 1, "zeros"),
    (5, 3, 2, 6, 1, 0, 1, 1, "zeros"),
    (4, 3, 4, 8, 2, 1, 1, 1, "zeros"),
    (4, 2, 3, 6, 1, 1, 1, 1, "reflect"),
    (3, 3, 3, 5, 1, 2, 1, 1, "replicate"),
    (4, 3, 3, 8, 2, 1, 1, 1, "circular"),
]


def _exact(w: torch.Tensor, spec: ConvSpec) -> float:
    return float(torch.linalg.matrix_norm(dense_conv_matrix(w, spec), 2))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c[4]}p{c[5]}d{c[6]}g{c[7]}-{c[8]}")
def test_gram_upper_and_power_lower_bracket_the_exact_norm(case):
    c_out, c_in, k, n, s, p, d, g, mode = case
    torch.manual_seed(sum(case[:8]))
    w = torch.randn(c_out, c_in // g, k, k, dtype=torch.float64)
    spec = ConvSpec.of((n, n), s, p, d, g, mode)
    exact = _exact(w, spec)
    bound = conv_bound(w, spec, iters=6, power_iters=30)
    assert bound.lower <= exact * (1 + 1e-9)
    assert bound.upper >= exact
    assert bound.lower >= 0.9 * exact  # power iteration gets close
    assert bound.upper <= (1.9 if mode in ("reflect", "replicate") else 1.2) * exact


@pytest.mark.parametrize("dims", [1, 3])
def test_other_spatial_dims(dims):
    torch.manual_seed(dims)
    w = torch.randn(4, 3, *([3] * dims), dtype=torch.float64)
    spec = ConvSpec.of((6,) * dims, 2, 1)
    exact = _exact(w, spec)
    bound = conv_bound(w, spec)
    assert bound.lower <= exact * (1 + 1e-9) <= bound.upper * (1 + 1e-9)


def test_circular_padding_matches_the_fft_value():
    torch.manual_seed(0)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    spec = ConvSpec.of((8, 8), 1, 1, padding_mode="circular")
    fft = circular_conv_norm(w, (8, 8))
    assert fft == pytest.approx(_exact(w, spec), rel=1e-9)  # the FFT value is the exact norm
    upper = conv_upper_bound(w, spec, iters=6)
    assert fft <= upper <= 1.01 * fft
    assert conv_upper_bound(w, spec, iters=10) == pytest.approx(fft, rel=1e-5)


def test_bounds_scale_linearly_with_the_weights():
    torch.manual_seed(1)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    spec = ConvSpec.of((7, 7), 2, 1)
    base, scaled = conv_bound(w, spec), conv_bound(-3.5 * w, spec)
    assert scaled.upper == pytest.approx(3.5 * base.upper, rel=1e-9)
    assert scaled.lower == pytest.approx(3.5 * base.lower, rel=1e-6)
    m = torch.randn(7, 5, dtype=torch.float64)
    assert matrix_bound(2 * m).upper == pytest.approx(2 * matrix_bound(m).upper, rel=1e-9)


def test_gram_bound_of_matrices():
    torch.manual_seed(2)
    a = torch.randn(5, 30, 12, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(a, 2)
    for iters, slack in ((0, 3.0), (3, 1.2), (8, 1.001)):
        bound = gram_bound(a, iters)
        assert bool((bound >= exact).all()) and bool((bound <= slack * exact).all())
    assert float(gram_bound(torch.zeros(3, 4), 5)) == 0.0
    exact_one = float(torch.linalg.matrix_norm(a[0], 2))
    assert matrix_bound(a[0]).lower == pytest.approx(exact_one, rel=1e-9)


def _empirical_lipschitz(fn, shape, trials: int = 200) -> float:
    torch.manual_seed(3)
    best = 0.0
    for _ in range(trials):
        x = torch.randn(1, *shape, dtype=torch.float64)
        dx = 1e-3 * torch.randn_like(x)
        best = max(best, float((fn(x + dx) - fn(x)).norm() / dx.norm()))
    return best


def test_pooling_constants_bound_the_operators():
    # overlapping max pooling (k3 s2): each entry lies in up to 2 windows per dim -> sqrt(4)
    const = pooling("max", [9, 9], 3, 2, 1)
    assert const == pytest.approx(2.0)
    assert _empirical_lipschitz(lambda x: F.max_pool2d(x, 3, 2, 1), (1, 9, 9)) <= const
    assert pooling("max", [8, 8], 2, 2) == 1.0
    # average pooling is linear: k = s gives exactly 1/k, overlapping windows are bounded
    avg = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    exact = float(torch.linalg.matrix_norm(F.avg_pool2d(avg, 2, 2).reshape(64, -1), 2))
    assert pooling("avg", [8, 8], 2, 2) == pytest.approx(exact)
    exact_overlap = float(torch.linalg.matrix_norm(F.avg_pool2d(avg, 3, 2, 1, count_include_pad=False).reshape(64, -1), 2))
    assert exact_overlap <= pooling("avg", [8, 8], 3, 2, 1, count_include_pad=False) + 1e-12
    glob = float(torch.linalg.matrix_norm(F.adaptive_avg_pool2d(avg, 1).reshape(64, -1), 2))
    assert adaptive("avg", [8, 8], 1) == pytest.approx(glob)
    uneven = float(torch.linalg.matrix_norm(F.adaptive_avg_pool2d(avg[:, :, :7, :7].reshape(64, 1, 7, 7), 3).reshape(64, -1), 2))
    assert uneven <= adaptive("avg", [7, 7], 3) + 1e-12


@pytest.mark.parametrize("name,fn", [("gelu", F.gelu), ("silu", F.silu), ("mish", F.mish), ("sigmoid", torch.sigmoid),
                                     ("hardswish", F.hardswish), ("tanh", torch.tanh), ("softplus", F.softplus)])
def test_activation_constants_are_the_largest_slope(name, fn):
    x = torch.linspace(-8, 8, 200_001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    slope = float(g.abs().max())
    assert slope <= ACTIVATION_LIPSCHITZ[name] * (1 + 1e-9)
    assert slope >= 0.995 * ACTIVATION_LIPSCHITZ[name]
    assert not math.isnan(slope)


def test_small_layers_get_the_exact_dense_norm():
    torch.manual_seed(5)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    spec = ConvSpec.of((2, 2), 1, 1)
    exact = _exact(w, spec)
    dense = conv_bound(w, spec, dense_max=2048)
    assert dense.method == "dense-svd" and dense.lower == pytest.approx(exact, rel=1e-12)
    gram = conv_bound(w, spec)  # the canvas bound is loose on a 2x2 map, but sound
    assert gram.upper >= dense.upper / (1 + 1e-6)
