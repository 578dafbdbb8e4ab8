"""Meta-solver regimes (thesis ch. 4.2): the u each iteration really uses, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import odekit.ode.block as block_module
from odekit.errors import UsageError
from odekit.io.datasets import load_dataset
from odekit.methods.ode_train import (
    ODETrainSettings,
    RegimeSettings,
    USampler,
    train_ode_classifier,
)
from odekit.models import build_model
from odekit.ode import SolverConfig


def _draws(settings: RegimeSettings, n: int) -> list[float]:
    sampler = USampler(settings)
    return [sampler.draw()[0] for _ in range(n)]


def test_standalone_keeps_the_config_u() -> None:
    sampler = USampler(RegimeSettings(kind="standalone", u=0.7))
    assert all(sampler.draw() == (None, None) for _ in range(5))


def test_switching_draws_uniformly_from_the_set() -> None:
    draws = _draws(RegimeSettings(kind="switching", u_set=(0.25, 0.5, 1.0), seed=3), 3000)
    values, counts = np.unique(draws, return_counts=True)
    assert values.tolist() == [0.25, 0.5, 1.0]
    assert np.all(np.abs(counts / 3000 - 1 / 3) < 0.03)
    assert draws == _draws(RegimeSettings(kind="switching", u_set=(0.25, 0.5, 1.0), seed=3), 3000)
    assert draws != _draws(RegimeSettings(kind="switching", u_set=(0.25, 0.5, 1.0), seed=4), 3000)


def test_smoothing_is_normal_and_resampled_into_the_unit_interval() -> None:
    narrow = np.array(_draws(RegimeSettings(kind="smoothing", u_mean=0.5, u_std=0.0125, seed=0), 4000))
    assert abs(narrow.mean() - 0.5) < 3 * 0.0125 / np.sqrt(4000)
    assert abs(narrow.std() - 0.0125) < 0.001
    # Near the edge, draws outside (0, 1] are redrawn: none escape, the mean shifts inward.
    edge = np.array(_draws(RegimeSettings(kind="smoothing", u_mean=0.95, u_std=0.2, seed=0), 4000))
    assert edge.min() > 0.0 and edge.max() <= 1.0
    assert edge.mean() < 0.95
    assert len(set(edge.tolist())) == 4000


def test_ensembling_normalises_weights() -> None:
    settings = RegimeSettings(kind="ensembling", u_set=(0.5, 1.0), weights=(1.0, 3.0))
    assert settings.weights == (0.25, 0.75)
    assert USampler(settings).draw() == (None, [(0.5, 0.25), (1.0, 0.75)])
    assert RegimeSettings(kind="ensembling").u_set == (0.5, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "smoothing", "u_mean": 0.0},
        {"kind": "switching", "u_set": (0.5, 1.5)},
        {"kind": "standalone", "u": -0.1},
        {"kind": "smoothing", "u_std": -1.0},
        {"kind": "ensembling", "u_set": (0.5, 1.0), "weights": (1.0,)},
        {"kind": "ensembling", "u_set": (0.5, 1.0), "weights": (0.0, 0.0)},
        {"kind": "switching", "weights": (1.0, 1.0)},
        {"kind": "annealing"},
    ],
)
def test_invalid_regimes_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        RegimeSettings(**kwargs)


def test_regimes_need_rk2() -> None:
    with pytest.raises(UsageError, match="rk2"):
        RegimeSettings(kind="switching").check_solver(SolverConfig(solver="euler", steps=2))


@pytest.mark.parametrize("kind", ["switching", "smoothing", "ensembling"])
def test_training_solves_with_the_drawn_u(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Spy on the solver calls of ODEBlock: each training iteration uses the regime's u."""
    seen: list[float] = []
    real = block_module.odeint

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():  # training calls; evaluation runs under no_grad
            seen.append(float(kwargs["u"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(block_module, "odeint", spy)
    data = load_dataset("digits")
    regime = RegimeSettings(kind=kind, u_set=(0.25, 1.0), u_mean=0.5, u_std=0.1, seed=5)
    model = build_model("odenet4", {"num_classes": 10, "in_channels": 1, "width": 4,
                                     "solver": {"solver": "rk2", "steps": 1}})  # fmt: skip
    result = train_ode_classifier(model, data, ODETrainSettings(iters=6, batch_size=32, eval_samples=32), regime,
                                  torch.device("cpu"))  # fmt: skip
    if kind == "ensembling":
        assert seen == [0.25, 1.0] * 6
        assert result.nfe_forward == 2 * 2  # two RK2 n=1 solves per iteration
    else:
        expected = _draws(regime, 6)
        assert seen == pytest.approx(expected)
        assert result.regime["draws"] == 6
    assert model.ode.u_override is None and model.ode.ensemble is None  # evaluation is standalone again
