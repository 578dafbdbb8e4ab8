"""Toy 2-D densities: seeded, right shape and scale, distinct shapes."""

from __future__ import annotations

import pytest
import torch

from odekit.errors import UsageError
from odekit.io.toy2d import TOY_DATASETS, load_toy, sample_toy

NAMES = ["2spirals", "pinwheel", "moons", "circles", "checkerboard"]


def test_registry_lists_all_five() -> None:
    assert TOY_DATASETS.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_seeded_shape_and_scale(name: str) -> None:
    a, b, c = sample_toy(name, 2001, seed=3), sample_toy(name, 2001, seed=3), sample_toy(name, 2001, seed=4)
    assert a.shape == (2001, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()
    assert 0.5 < float(a.std()) < 3.0  # the usual [-4, 4]^2 scale of these sets
    assert float(a.abs().max()) < 6.0
    assert float(a.mean(0).abs().max()) < 0.3  # all five are centred


def test_circles_radii_and_checkerboard_squares() -> None:
    r = sample_toy("circles", 4000, seed=0).norm(dim=1)
    inner, outer = (r < 2.25).float().mean(), (r >= 2.25).float().mean()
    assert abs(float(inner) - 0.5) < 0.02 and abs(float(outer) - 0.5) < 0.02
    board = sample_toy("checkerboard", 4000, seed=0) / 2.0
    parity = (torch.floor(board[:, 0]) + torch.floor(board[:, 1])) % 2
    assert torch.all(parity == parity[0])  # every point on squares of one colour


def test_train_and_test_sets_differ_and_describe() -> None:
    toy = load_toy("moons", 300, 100, seed=1)
    assert toy.train.shape == (300, 2) and toy.test.shape == (100, 2)
    assert not torch.equal(toy.train[:100], toy.test)
    assert toy.describe()["kind"] == "toy2d"


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(UsageError, match="unknown toy data set"):
        sample_toy("swissroll", 10)
    with pytest.raises(UsageError):
        sample_toy("moons", 0)
