"""docs/cli.md is generated from the Typer app and must not go stale."""

from __future__ import annotations

from pathlib import Path

from odekit.cli.docs import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_cli_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `make docs`"


def test_every_command_is_documented() -> None:
    text = DOC.read_text()
    for command in ("info", "train-ode", "smoothness-check", "reduce", "asnet", "attack"):
        assert f"## odekit {command}\n" in text
