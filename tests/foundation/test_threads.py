"""`--threads`: reaches torch in every command and is recorded in report.json."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.device import default_threads, set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_capped_by_omp(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() >= 1


def test_set_threads_rejects_out_of_range(restore_threads):
    from odekit.errors import UsageError

    with pytest.raises(UsageError):
        set_threads(0)
    assert set_threads(1) == 1 and torch.get_num_threads() == 1


def test_threads_reach_torch_and_report(tmp_path, restore_threads, monkeypatch):
    seen: list[int] = []
    import odekit.device as device

    original = device.seed_everything

    def spy(seed: int) -> None:
        seen.append(torch.get_num_threads())
        original(seed)

    monkeypatch.setattr(device, "seed_everything", spy)
    torch.set_num_threads(2)
    result = CliRunner().invoke(
        app,
        ["smoothness-check", "checkpoints/odenet4_digits_euler.safetensors", "--solvers", "euler", "--steps", "4",
         "--samples", "40", "--threads", "1", "--out", str(tmp_path / "run"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == [1]
    assert json.loads(result.stdout)["threads"] == 1
