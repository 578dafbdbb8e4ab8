"""Universal perturbations: budgets, bounds, the analytic AS direction, UAP passes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from odekit.errors import DataError, UsageError
from odekit.methods.attacks import (
    ActiveSubspaceAttack,
    ActiveSubspaceSettings,
    RandomAttack,
    UAPAttack,
    UAPSettings,
    UniversalSettings,
    apply_perturbation,
    evaluate_universal,
    lp_norm,
)


class LinearScore(nn.Module):
    """Two-class logits [0, a^T x - b]: the thesis example 6.4.1 as a classifier."""

    def __init__(self, b: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, -1.0]), requires_grad=False)
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.reshape(len(x), -1) @ self.a - self.b
        return torch.stack([torch.zeros_like(f), f], 1)


@pytest.mark.parametrize("norm,delta", [("2", 0.8), ("inf", 0.08)])
@pytest.mark.parametrize("name", ["active-subspace", "uap", "random"])
def test_budget_and_bounds(small_mlp, digits_pixels, name, norm, delta):
    x, _, xt, _ = digits_pixels
    settings = {
        "active-subspace": ActiveSubspaceSettings(norm=norm, delta=delta, max_iter=8),
        "uap": UAPSettings(norm=norm, delta=delta, max_passes=2),
        "random": UniversalSettings(norm=norm, delta=delta),
    }[name]
    cls = {"active-subspace": ActiveSubspaceAttack, "uap": UAPAttack, "random": RandomAttack}[name]
    result = cls(settings)(small_mlp, x[:60], seed=1)
    assert result.v.shape == x.shape[1:]
    assert lp_norm(result.v, norm) <= delta * (1 + 1e-5)
    assert float(result.v.abs().max()) <= 1.0
    attacked = apply_perturbation(xt, result.v)
    assert float(attacked.min()) >= 0.0 and float(attacked.max()) <= 1.0
    assert 0.0 <= result.fooling_rate_fit <= 1.0
    if name == "random":
        assert lp_norm(result.v, norm) == pytest.approx(delta, rel=1e-5)


def test_as_direction_is_analytic_on_linear_model_and_beats_pca():
    """Example 6.4.1: grad f = a, so the AS direction is a/||a|| = [1, -1]/sqrt(2), while the
    first principal component of uniform x in [0, 1]^2 is [1, 1]/sqrt(2), along which f is flat."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 2, generator=g)
    model = LinearScore()
    attack = ActiveSubspaceAttack(ActiveSubspaceSettings(delta=0.3))
    target = model(x).argmax(1)
    d = attack._direction(model, x, target, batch_size=128)
    a_unit = torch.tensor([1.0, -1.0]) / math.sqrt(2)
    assert abs(float(d @ a_unit)) == pytest.approx(1.0, abs=1e-6)
    # PCA of the (uncentred) data: E[x x^T] = [[1/3, 1/4], [1/4, 1/3]] -> w1 = [1, 1]/sqrt(2)
    _, vecs = torch.linalg.eigh(x.T @ x / len(x))
    w1 = vecs[:, -1]
    assert abs(float(w1 @ torch.tensor([1.0, 1.0]) / math.sqrt(2))) == pytest.approx(1.0, abs=2e-2)

    def spread(v: torch.Tensor) -> float:  # E[(f(x + v) - f(x))^2], eq. 6.30
        return float(((model(x + v)[:, 1] - model(x)[:, 1]) ** 2).mean())

    assert spread(0.3 * d) == pytest.approx(2 * 0.3**2, rel=1e-5)
    assert spread(0.3 * w1) < 1e-2 * spread(0.3 * d)
    # the full algorithm ends on the analytic direction and fools where PCA cannot; with b = 1
    # no x in [0, 1]^2 can cross f = 0, so the classifier test moves the boundary to b = 0
    model = LinearScore(b=0.0)
    result = attack(model, x)
    assert abs(float(result.v @ a_unit)) / lp_norm(result.v, "2") > 0.999
    clean = model(x).argmax(1)
    pca_rate = float((model(apply_perturbation(x, 0.3 * w1)).argmax(1) != clean).float().mean())
    assert result.fooling_rate_fit > pca_rate + 0.05


def test_uap_fooling_rate_rises_over_passes(small_mlp, digits_pixels):
    x, _, _, _ = digits_pixels
    result = UAPAttack(UAPSettings(delta=1.0, max_passes=4, target_fooling=1.0))(
        small_mlp, x[:100], seed=0
    )
    history = result.history
    assert len(history) == 4
    assert all(b >= a for a, b in itertools.pairwise(history))
    assert history[-1] > history[0]
    assert result.fooling_rate_fit == pytest.approx(history[-1])


def test_as_beats_random_and_generalises(small_mlp, digits_pixels):
    x, _, xt, yt = digits_pixels
    as_v = ActiveSubspaceAttack(ActiveSubspaceSettings(delta=1.0))(small_mlp, x[:100]).v
    rand_v = RandomAttack(UniversalSettings(delta=1.0))(small_mlp, x[:100]).v
    as_test = evaluate_universal(small_mlp, xt, yt, as_v)
    rand_test = evaluate_universal(small_mlp, xt, yt, rand_v)
    assert as_test["fooling_rate"] > rand_test["fooling_rate"] + 0.2
    assert as_test["robust_accuracy"] < as_test["clean_accuracy"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delta": 0.0},
        {"delta": -1.0},
        {"norm": "l3"},
        {"gamma": 1.0},
        {"alpha": -1},
        {"max_iter": 0},
    ],
)
def test_settings_reject_bad_values(kwargs):
    with pytest.raises(UsageError):
        ActiveSubspaceSettings(**kwargs)


def test_input_outside_box_is_a_data_error(small_mlp):
    with pytest.raises(DataError, match="bounds"):
        RandomAttack(UniversalSettings(delta=1.0))(small_mlp, torch.full((4, 1, 8, 8), 1.5))
