"""A .pt2 program exported for one batch size is named as the cause, with the re-export that fixes it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from odekit.cli.app import app


def test_program_with_a_fixed_batch_size_gets_the_export_hint(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    program = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), program)
    result = CliRunner().invoke(
        app, ["reduce", str(program), "--data", "digits", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert "Error:" in result.output and "dynamic batch" in result.output
    assert "Traceback" not in result.output
