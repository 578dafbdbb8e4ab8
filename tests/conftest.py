"""Shared fixtures: paths of the shipped checkpoints and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "checkpoints"

# Plain progress lines (stderr is not a terminal under CliRunner) would interleave with the
# one-line errors tests compare; tests of the progress lines turn them back on.
os.environ.setdefault("ODEKIT_PROGRESS", "off")

# Two cores are shared by the whole suite; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def checkpoints_dir() -> Path:
    return CHECKPOINTS
