"""Heavier checks on the shipped checkpoints (run with -m slow)."""

from __future__ import annotations

import pytest

from odekit.io.checkpoints import load_model
from odekit.io.datasets import dataset_for_model
from odekit.methods.attacks import (
    ActiveSubspaceAttack,
    ActiveSubspaceSettings,
    DeepFoolAttack,
    DeepFoolSettings,
    PGDAttack,
    PGDSettings,
    RandomAttack,
    UniversalSettings,
    evaluate_adversarial,
    evaluate_universal,
    pixel_model,
    to_pixels,
)

pytestmark = pytest.mark.slow


def _load(path):
    loaded = load_model(path)
    data = dataset_for_model(
        loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset
    )
    return pixel_model(loaded.model, data), data


@pytest.mark.parametrize(
    "cls,stype,kwargs,eps",
    [
        (PGDAttack, PGDSettings, {"norm": "inf", "steps": 20}, 0.1),
        (PGDAttack, PGDSettings, {"norm": "2", "steps": 20}, 2.0),
        (DeepFoolAttack, DeepFoolSettings, {"norm": "2", "steps": 50}, 2.0),
    ],
)
def test_foolbox_agreement_on_lenet5(lenet5_path, cls, stype, kwargs, eps):
    model, data = _load(lenet5_path)
    x, y = to_pixels(data.test.x[:200], data), data.test.y[:200]
    ours = cls(stype(backend="torch", **kwargs))(model, x, y, eps, seed=0).x_adv
    theirs = cls(stype(backend="foolbox", **kwargs))(model, x, y, eps, seed=0).x_adv
    r_ours = evaluate_adversarial(model, x, y, ours)["robust_accuracy"]
    r_theirs = evaluate_adversarial(model, x, y, theirs)["robust_accuracy"]
    assert abs(r_ours - r_theirs) <= 0.05


def test_active_subspace_far_above_random_on_lenet300(lenet300_path):
    model, data = _load(lenet300_path)
    x_fit = to_pixels(data.train.subset(200, seed=0).x, data)
    x_test, y_test = to_pixels(data.test.x, data), data.test.y
    as_v = ActiveSubspaceAttack(ActiveSubspaceSettings(delta=4.0))(model, x_fit).v
    rand_v = RandomAttack(UniversalSettings(delta=4.0))(model, x_fit).v
    as_rate = evaluate_universal(model, x_test, y_test, as_v)["fooling_rate"]
    rand_rate = evaluate_universal(model, x_test, y_test, rand_v)["fooling_rate"]
    assert as_rate > 0.5 > 0.1 > rand_rate
