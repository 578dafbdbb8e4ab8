"""--normalize grammar, --layout and --pixel-max for .npz data (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odekit.errors import DataError, UsageError
from odekit.io.datasets import load_dataset
from odekit.io.preprocessing import Normalization, Preprocessing, parse_input_shape, parse_normalize


def test_normalize_grammar():
    assert parse_normalize("none").as_dict() == {"mean": [0.0], "std": [1.0]}
    assert parse_normalize("DATA").as_dict() is None
    assert parse_normalize("0.5,0.25") == Normalization("given", (0.5,), (0.25,))
    per_channel = parse_normalize("0.49,0.48,0.45/0.25,0.24,0.26")
    assert per_channel.mean == (0.49, 0.48, 0.45) and per_channel.std == (0.25, 0.24, 0.26)
    for bad in ("0.5", "a,b", "0.5,0.25,0.1", "0.1,0.2/0.3", "0.5,0"):
        with pytest.raises(UsageError):
            parse_normalize(bad)
    assert parse_input_shape("3x32x32") == parse_input_shape("3,32,32") == (3, 32, 32)
    with pytest.raises(UsageError):
        Preprocessing(layout="nwhc")


def _npz(tmp_path, x, y):
    path = tmp_path / f"d{len(list(tmp_path.iterdir()))}.npz"
    np.savez(path, x=x, y=y, x_test=x, y_test=y)
    return str(path)


def test_layout_and_pixel_range_are_read_as_told(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(6, 6, 5, 3), dtype=np.uint8)
    y = np.arange(6) % 2
    path = _npz(tmp_path, nhwc, y)
    none = {"mean": [0.0], "std": [1.0]}
    auto = load_dataset(path, normalization=none)
    assert auto.input_shape == (3, 6, 5)  # channels-last detected
    # 4 rows of 3 channels look like 4 channels: only --layout can tell
    ambiguous = _npz(tmp_path, nhwc[:, :4], y)
    assert load_dataset(ambiguous, normalization=none).input_shape == (4, 5, 3)
    assert load_dataset(ambiguous, normalization=none, layout="nhwc").input_shape == (3, 4, 5)
    expected = torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(auto.test.x, expected)
    # a 3x4x5 NCHW array whose last axis is 5 stays as it is; NHWC forces the permutation
    nchw = rng.random((6, 3, 4, 3)).astype(np.float32)
    path2 = _npz(tmp_path, nchw, y)
    assert load_dataset(path2, normalization=none, layout="nchw").input_shape == (3, 4, 3)
    assert load_dataset(path2, normalization=none, layout="nhwc").input_shape == (3, 3, 4)
    # floats in 0..255 with --pixel-max 255, then a per-channel normalisation
    path3 = _npz(tmp_path, nhwc.astype(np.float32), y)
    data = load_dataset(path3, normalization={"mean": [0.5, 0.4, 0.3], "std": [0.5, 0.2, 0.1]}, pixel_max=255)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.2, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(data.test.x, (expected - mean) / std, atol=1e-6)
    assert data.normalization() == {"mean": [0.5, 0.4, 0.3], "std": [0.5, 0.2, 0.1]}
    # one MEAN,STD is repeated per channel; a wrong-length list is refused
    assert load_dataset(path, normalization={"mean": [0.5], "std": [0.25]}).mean == [0.5, 0.5, 0.5]
    with pytest.raises(DataError, match="2 channel values"):
        load_dataset(path, normalization={"mean": [0.5, 0.5], "std": [0.25, 0.25]})


def test_train_ode_records_the_normalisation_it_was_told(tmp_path):
    import json

    from typer.testing import CliRunner

    from odekit.cli.app import app
    from odekit.io.checkpoints import load_model

    result = CliRunner().invoke(app, [
        "train-ode", "--width", "8", "--batch-size", "64", "--iters", "2", "--eval-samples", "32", "--normalize",
        "0.5,0.25", "--input-shape", "1,12,12", "-o", str(tmp_path), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)["inputs"]["data"]
    assert data["normalization"] == {"mean": [0.5], "std": [0.25]} and data["input_shape"] == [1, 12, 12]
    meta = load_model(tmp_path / "model.safetensors").meta
    assert meta.normalization == {"mean": [0.5], "std": [0.25]} and meta.input_shape == [1, 12, 12]
