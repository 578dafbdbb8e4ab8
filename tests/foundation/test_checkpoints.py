"""Round trips of every checkpoint format and robustness of the loader to bad bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from odekit.errors import CheckpointError, InputFileError, OdekitError, UsageError
from odekit.io.checkpoints import (
    ModelMeta,
    load_model,
    save_model,
    save_state_dict_pt,
    save_torchscript,
)
from odekit.models import build_model

ARCHS = [
    ("lenet300", {"num_classes": 10}, (1, 28, 28)),
    ("lenet5", {"num_classes": 10}, (1, 28, 28)),
    ("vgg11_bn", {"num_classes": 10, "width": 0.125, "in_channels": 1}, (1, 32, 32)),
    ("resnet20", {"num_classes": 7, "width": 0.5}, (3, 32, 32)),
    ("mlp", {"in_features": 12, "hidden": [8, 6], "num_classes": 3, "activation": "tanh"}, (12,)),
]


def _meta(arch: str, args: dict, shape: tuple[int, ...]) -> ModelMeta:
    return ModelMeta(arch=arch, args=args, num_classes=args.get("num_classes"), input_shape=list(shape))


def _randomised(arch: str, args: dict) -> nn.Module:
    torch.manual_seed(1)
    model = build_model(arch, args)
    with torch.no_grad():  # non-trivial BN statistics so that buffers are checked too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize(("arch", "args", "shape"), ARCHS)
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "torchscript"])
def test_round_trip_gives_equal_outputs(tmp_path: Path, arch: str, args: dict, shape: tuple, fmt: str) -> None:
    model = _randomised(arch, args)
    meta = _meta(arch, args, shape)
    x = torch.randn(3, *shape)
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_model(path, model, meta)
    elif fmt == "pt":
        save_state_dict_pt(path, model, meta)
    else:
        save_torchscript(path, model, meta, x)
    loaded = load_model(path)
    assert loaded.meta.arch == arch and loaded.meta.input_shape == list(shape)
    assert not isinstance(loaded.model, torch.jit.ScriptModule)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_plain_state_dict_needs_arch(tmp_path: Path) -> None:
    model = _randomised("lenet5", {"num_classes": 10})
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UsageError, match="`arch`"):
        load_model(tmp_path / "plain.pt")
    loaded = load_model(tmp_path / "plain.pt", arch="lenet5", num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.model(x), model(x))
    assert loaded.meta.input_shape == [1, 28, 28]


def test_dataparallel_prefix_and_nested_state_dict(tmp_path: Path) -> None:
    model = _randomised("lenet300", {"num_classes": 10})
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ddp.pth")
    loaded = load_model(tmp_path / "ddp.pth", arch="lenet300", num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.model(x), model(x))


def test_wrong_architecture_names_the_tensor(tmp_path: Path) -> None:
    model = _randomised("lenet300", {"num_classes": 10})
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "m.pt", arch="lenet300", num_classes=7)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "m.pt", arch="lenet5", num_classes=10)


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    model = _randomised("lenet300", {"num_classes": 10})
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="`trust_checkpoint`"):
        load_model(tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", trust_checkpoint=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.model(x), model(x))


def test_torchscript_without_metadata_runs_as_is(tmp_path: Path) -> None:
    model = _randomised("lenet5", {"num_classes": 10})
    x = torch.randn(2, 1, 28, 28)
    torch.jit.save(torch.jit.trace(model, x), str(tmp_path / "ts.pt"))
    loaded = load_model(tmp_path / "ts.pt")
    assert loaded.format == "torchscript"
    torch.testing.assert_close(loaded.model(x), model(x))
    rebuilt = load_model(tmp_path / "ts.pt", arch="lenet5", num_classes=10)
    assert not isinstance(rebuilt.model, torch.jit.ScriptModule)
    torch.testing.assert_close(rebuilt.model(x), model(x))


def test_metadata_survives_and_records_history(tmp_path: Path) -> None:
    model = _randomised("lenet300", {"num_classes": 10})
    meta = _meta("lenet300", {"num_classes": 10}, (1, 28, 28))
    child = meta.derived("lenet300", {"num_classes": 10}, {"command": "reduce", "layers": "1-2"}, "abc")
    save_model(tmp_path / "child.safetensors", model, child)
    loaded = load_model(tmp_path / "child.safetensors")
    assert loaded.meta.history == [{"command": "reduce", "layers": "1-2"}]
    assert loaded.meta.source_sha256 == "abc"
    assert len(loaded.sha256) == 64


def test_save_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    model = _randomised("lenet300", {"num_classes": 10})
    meta = _meta("lenet300", {"num_classes": 10}, (1, 28, 28))
    path = save_model(tmp_path / "m.safetensors", model, meta)
    before = path.read_bytes()
    with pytest.raises(OdekitError, match="exists"):
        save_model(path, model, meta)
    assert path.read_bytes() == before
    save_model(path, model, meta, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    with pytest.raises(InputFileError):
        load_model(tmp_path / "absent.safetensors")
    with pytest.raises(InputFileError):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("valid")
    model = _randomised("mlp", {"in_features": 4, "hidden": [3], "num_classes": 2})
    meta = _meta("mlp", {"in_features": 4, "hidden": [3], "num_classes": 2}, (4,))
    save_model(folder / "a.safetensors", model, meta)
    save_state_dict_pt(folder / "a.pt", model, meta)
    save_torchscript(folder / "a.ts", model, meta, torch.randn(1, 4))
    return {name: (folder / name).read_bytes() for name in ("a.safetensors", "a.pt", "a.ts")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_random_bytes_raise_our_error(tmp_path: Path, valid_bytes: dict[str, bytes], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(valid_bytes)))
    original = valid_bytes[name]
    kind = data.draw(st.sampled_from(["truncate", "random", "flip"]))
    if kind == "truncate":
        blob = original[: data.draw(st.integers(0, len(original) - 1))]
    elif kind == "random":
        blob = data.draw(st.binary(min_size=0, max_size=256))
    else:
        pos = data.draw(st.integers(0, len(original) - 1))
        blob = original[:pos] + bytes([original[pos] ^ 0xFF]) + original[pos + 1 :]
    path = tmp_path / f"fuzz-{name}"
    path.write_bytes(blob)
    try:
        loaded = load_model(path, arch="mlp", num_classes=2)
    except OdekitError:
        return
    # A flipped byte inside tensor data (or an ignored zip member) still loads: it must run.
    assert isinstance(loaded.model(torch.randn(1, 4)), torch.Tensor)


def test_safetensors_header_is_json_with_metadata(tmp_path: Path) -> None:
    model = _randomised("mlp", {"in_features": 4, "hidden": [3], "num_classes": 2})
    meta = _meta("mlp", {"in_features": 4, "hidden": [3], "num_classes": 2}, (4,))
    data = save_model(tmp_path / "m.safetensors", model, meta).read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    stored = json.loads(header["__metadata__"]["odekit"])
    assert stored["arch"] == "mlp" and stored["odekit_version"]
