"""Shared fixtures: single-threaded tiny models and an in-process CLI helper."""

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
    # Many tiny kernels: one thread avoids OpenMP spin contention on the shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Cli:
    """Runs `odekit` in-process; the click Result keeps stdout and stderr apart."""

    def invoke(self, args: list[str]) -> Any:
        return CliRunner().invoke(app, args)

    def json(self, args: list[str]) -> dict[str, Any]:
        result = self.invoke([*args, "--json"])
        assert result.exit_code == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    def train_tiny(self, out: Path, *extra: str) -> dict[str, Any]:
        """A few-second ODENet4 run on digits (width 8 unless overridden)."""
        return self.json(["train-ode", "--width", "8", "--batch-size", "64", "--seed", "0", "-o", str(out), *extra])


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()
