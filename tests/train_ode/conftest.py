"""Shared fixtures: tiny models train single-threaded (threads only add overhead at this size)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from odekit.cli.app import app


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(args: list[str]) -> Any:
    """Run the CLI in-process; returns the click Result (stdout and stderr kept apart)."""
    return CliRunner().invoke(app, args)


def invoke_json(args: list[str]) -> dict[str, Any]:
    result = invoke([*args, "--json"])
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def train_tiny(out: Path, *extra: str) -> dict[str, Any]:
    """A few-second ODENet4 run on digits (width 8)."""
    return invoke_json(["train-ode", "--width", "8", "--batch-size", "64", "--seed", "0", "-o", str(out), *extra])
