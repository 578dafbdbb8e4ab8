"""`odekit info` and the shared error handling, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.models import build_model

SHIPPED = ["lenet300_digits", "lenet5_digits", "vgg11_digits"]


@pytest.mark.parametrize("name", SHIPPED)
def test_info_json_matches_the_documented_shape(runner: CliRunner, checkpoints_dir: Path, name: str) -> None:
    result = runner.invoke(app, ["info", str(checkpoints_dir / f"{name}.safetensors"), "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert {"layers", "params", "flops"} <= payload.keys()
    keys = {"index", "name", "type", "in_shape", "out_shape", "params", "flops"}
    assert all(keys <= layer.keys() for layer in payload["layers"])
    assert payload["flops"] == sum(layer["flops"] for layer in payload["layers"])
    assert payload["params"] > 0


def test_info_table_lists_every_layer(runner: CliRunner, checkpoints_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(checkpoints_dir / "lenet5_digits.safetensors")])
    assert result.exit_code == 0
    for alias in ("conv1", "conv2", "fc3", "fc4", "fc5"):
        assert alias in result.stdout
    assert "2 x multiply-adds" in result.stdout


def _assert_one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


def test_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    line = _assert_one_line_error(runner.invoke(app, ["info", str(tmp_path / "none.safetensors")]))
    assert "does not exist" in line


def test_truncated_safetensors(runner: CliRunner, tmp_path: Path, checkpoints_dir: Path) -> None:
    data = (checkpoints_dir / "lenet5_digits.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    line = _assert_one_line_error(runner.invoke(app, ["info", str(tmp_path / "cut.safetensors")]))
    assert "Hint:" in line


def test_corrupt_file(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    _assert_one_line_error(runner.invoke(app, ["info", str(tmp_path / "junk.pt")]))


def test_shape_mismatch_lists_each_key_on_its_own_line(runner: CliRunner, tmp_path: Path) -> None:
    torch.save(build_model("lenet300", {"num_classes": 10}).state_dict(), tmp_path / "m.pt")
    result = runner.invoke(app, ["info", str(tmp_path / "m.pt"), "--arch", "lenet300", "--num-classes", "5"])
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Error: ") and "2 shape mismatches" in lines[0] and "Hint:" in lines[0]
    assert lines[1:] == [
        "  shape mismatch: 5.weight: checkpoint 10x100, model 5x100",
        "  shape mismatch: 5.bias: checkpoint 10, model 5",
    ]


def test_unknown_architecture_lists_the_registry(runner: CliRunner, tmp_path: Path) -> None:
    torch.save(build_model("lenet300", {}).state_dict(), tmp_path / "m.pt")
    line = _assert_one_line_error(runner.invoke(app, ["info", str(tmp_path / "m.pt"), "--arch", "alexnet"]))
    assert "lenet300" in line  # the registry lists valid names


def test_debug_shows_traceback(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "none.pt"), "--debug"])
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_parse_errors_exit_two(runner: CliRunner) -> None:
    assert runner.invoke(app, ["info", "x.pt", "--num-classes", "zero"]).exit_code == 2
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("odekit ")
