"""Data sources: digits, .npz files and clear errors for missing or bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from odekit.errors import DataError, UsageError
from odekit.io.datasets import load_dataset


def test_digits_split_shapes_and_normalisation() -> None:
    data = load_dataset("digits", input_shape=(3, 32, 32))
    assert data.train.x.shape == (1437, 3, 32, 32) and data.test.x.shape == (360, 3, 32, 32)
    assert data.num_classes == 10 and set(data.test.y.tolist()) == set(range(10))
    # training split normalised to zero mean / unit std per channel
    assert data.train.x.mean().abs() < 1e-4 and (data.train.x.std() - 1).abs() < 1e-2
    lo, hi = data.bounds
    assert torch.all(data.train.x >= lo - 1e-5) and torch.all(data.train.x <= hi + 1e-5)


def test_digits_split_is_fixed() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.test.y, b.test.y) and torch.equal(a.train.x, b.train.x)


def test_recorded_normalisation_is_reused() -> None:
    data = load_dataset("digits", normalization={"mean": [0.5], "std": [0.25]})
    raw = load_dataset("digits", normalization={"mean": [0.0], "std": [1.0]})
    torch.testing.assert_close(data.train.x, (raw.train.x - 0.5) / 0.25)


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.input_shape == (3, 8, 8) and len(data.train) == 40 and len(data.test) == 10
    assert data.num_classes == 4


def test_npz_with_nan_is_rejected(tmp_path: Path) -> None:
    x = np.zeros((10, 5), dtype=np.float32)
    x[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(10))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))


def test_npz_without_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 2)))
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_dataset(str(tmp_path / "bad.npz"))


def test_missing_torchvision_folder_says_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(UsageError, match="`data_dir`"):
        load_dataset("mnist")
    with pytest.raises(UsageError, match="unknown data set"):
        load_dataset("imagenet-21k")


def test_shape_mismatch_for_flat_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "flat.npz", x=np.zeros((10, 5), dtype=np.float32), y=np.zeros(10))
    with pytest.raises(DataError, match="expects"):
        load_dataset(str(tmp_path / "flat.npz"), input_shape=(7,))
