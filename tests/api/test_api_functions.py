"""The Python API on an in-memory model: typed results, the files `save` writes, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import odekit
from odekit.errors import LayerSelectionError, OdekitError, UsageError


def test_reduce_in_memory_model_with_layers_as_modules(digits_mlp, digits_tensors, tmp_path):
    result = odekit.reduce(digits_mlp, digits_tensors, layers=(digits_mlp[1], digits_mlp[3]), rank=16, mode="region")
    report = result.to_dict()
    assert report["ranks"] == [16, 16] and report["modified_layers"] == "1-2"
    assert report["flop_reduction"] > 1.5  # 64 and 32 wide layers sampled at 24 rows each
    assert report["student"]["accuracy"] > 0.9
    x = digits_tensors[0][:8]
    assert result.student is not None and result.student(x).shape == (8, 10)
    with pytest.raises(AttributeError):  # frozen
        result.student = None  # type: ignore[misc]
    path = result.save(tmp_path / "run")
    saved = json.loads(path.read_text())
    assert saved["command"] == "reduce" and saved["results"]["reload_max_abs_diff"] < 1e-5
    # the in-memory class is no registered architecture: the student is a .pt2 program
    assert {"report.json", "report.md", "student.pt2", "singular_values.png"} <= set(saved["outputs"])
    reloaded = odekit.load(tmp_path / "run" / "student.pt2")
    assert torch.allclose(reloaded(x), result.student(x), atol=1e-5)


def test_layer_names_strings_and_indices_agree(digits_mlp, digits_tensors):
    by_index = odekit.reduce(digits_mlp, digits_tensors, layers="1-2", rank=8, mode="region")
    by_names = odekit.reduce(digits_mlp, digits_tensors, layers=["1", "2"], rank=8, mode="region")
    assert by_index.to_dict()["ranks"] == by_names.to_dict()["ranks"] == [8, 8]
    assert by_index.to_dict()["student"]["accuracy"] == by_names.to_dict()["student"]["accuracy"]


def test_data_as_dataset_or_loader_gives_the_same_split(digits_mlp, digits_tensors):
    x, y = digits_tensors
    from odekit.api.inputs import as_dataset

    direct = as_dataset((x, y))
    via_loader = as_dataset(DataLoader(TensorDataset(x, y), batch_size=100))
    via_dataset = as_dataset(TensorDataset(x, y))
    for other in (via_loader, via_dataset):
        assert torch.equal(other.train.x, direct.train.x) and torch.equal(other.test.y, direct.test.y)
    assert len(direct.train) + len(direct.test) == len(y) and abs(len(direct.test) / len(y) - 0.2) < 0.01


def test_registered_checkpoint_keeps_its_metadata(tmp_path):
    model = odekit.load("checkpoints/lenet300_digits.safetensors")
    result = odekit.reduce(model, layers="1-2", rank=20, mode="region")  # its own data set (digits) from the metadata
    assert result.registered and result.to_dict()["flop_reduction"] > 5
    saved = json.loads(result.save(tmp_path / "r").read_text())
    assert "student.safetensors" in saved["outputs"]
    student = odekit.load(tmp_path / "r" / "student.safetensors")
    assert isinstance(student, torch.nn.Module)


def test_asnet_cut_as_module(digits_mlp, digits_tensors, tmp_path):
    result = odekit.asnet(digits_mlp, digits_tensors, cut=digits_mlp[1], rank=10)
    report = result.to_dict()
    assert report["cut"]["index"] == 1 and report["cut"]["rank"] == 10
    assert report["asnet"]["accuracy"] > 0.8
    saved = json.loads(result.save(tmp_path / "a").read_text())
    assert {"asnet.pt2", "spectrum.png", "baselines.png"} <= set(saved["outputs"])
    assert saved["results"]["reload_max_abs_diff"] < 1e-5


def test_attack_universal_vector_has_the_budget(digits_mlp, digits_tensors, tmp_path):
    result = odekit.attack(digits_mlp, digits_tensors, delta=3.0, fit_samples=100)
    v = result.perturbation
    assert v is not None and v.shape == (1, 8, 8)
    assert float(v.norm()) == pytest.approx(3.0, rel=1e-4)
    assert 0.0 <= result.fooling_rate <= 1.0  # type: ignore[operator]
    saved = json.loads(result.save(tmp_path / "u").read_text())
    assert "perturbation.safetensors" in saved["outputs"]


def test_errors_are_value_errors_naming_parameters(digits_mlp, digits_tensors):
    assert issubclass(OdekitError, ValueError) and issubclass(UsageError, OdekitError)
    with pytest.raises(ValueError, match="`cut`"):
        odekit.asnet(digits_mlp, digits_tensors)
    with pytest.raises(LayerSelectionError):
        odekit.reduce(digits_mlp, digits_tensors, layers=torch.nn.Linear(3, 3))
    with pytest.raises(UsageError, match="no `frobnicate`"):
        odekit.reduce(digits_mlp, digits_tensors, layers="1-2", frobnicate=1)
    with pytest.raises(ValueError, match="pixel values span"):  # the box is [0, 1] unless normalization says
        odekit.attack(digits_mlp, (digits_tensors[0] * 5, digits_tensors[1]), delta=1.0)


def test_cli_shows_flags_where_the_library_names_parameters():
    from odekit.cli.errors import cli_text, exception_line

    assert cli_text("`fit_samples` must be positive. Hint: e.g. `rank=50`") == "--fit-samples must be positive. Hint: e.g. --rank 50"
    line, code = exception_line(UsageError("`max_iter` too small", "raise `sketch_size`"))  # type: ignore[misc]
    assert line == "--max-iters too small. Hint: raise --sketch-size" and code == 1


def test_import_odekit_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, odekit; assert 'torch' not in sys.modules; print(sorted(odekit.__all__)[:3])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
