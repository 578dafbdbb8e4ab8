"""`odekit smoothness-check`: grid shape, deterministic verdict, the rule, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from odekit.errors import UnsupportedModelError, UsageError
from odekit.io.datasets import load_dataset
from odekit.methods.smoothness import SmoothnessSettings, smoothness_check
from odekit.models import build_model
from odekit.models.ode_models import ode_blocks

if TYPE_CHECKING:
    from conftest import Cli

ROOT = Path(__file__).resolve().parents[2]
SOLVERS, STEPS = ["euler", "rk2", "rk4"], [2, 4, 16]


@pytest.fixture(scope="module")
def trained(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two tiny ODENet4s trained with Euler n=2 and Euler n=16."""
    torch.set_num_threads(1)
    out = {}
    for n in (2, 16):
        folder = tmp_path_factory.mktemp(f"euler{n}")
        cli.train_tiny(folder, "--solver", "euler", "--steps", str(n), "--iters", "20", "--eval-samples", "64")
        out[n] = folder / "model.safetensors"
    return out


def _check(cli: Cli, model: Path, out: Path, *extra: str) -> dict:
    return cli.json(["smoothness-check", str(model), "--solvers", ",".join(SOLVERS),
                     "--steps", ",".join(map(str, STEPS)), "--samples", "100", "-o", str(out), *extra])["results"]  # fmt: skip


@pytest.mark.parametrize("n0", [2, 16])
def test_grid_shape_rule_and_deterministic_verdict(cli: Cli, trained: dict[int, Path], tmp_path: Path, n0: int) -> None:
    first = _check(cli, trained[n0], tmp_path / "a")
    again = _check(cli, trained[n0], tmp_path / "b")
    grid = first["grid"]
    assert [(g["solver"], g["n"]) for g in grid] == [(s, n) for s in SOLVERS for n in STEPS]
    stages = {"euler": 1, "rk2": 2, "rk4": 4}
    assert all(g["nfe"] == stages[g["solver"]] * g["n"] for g in grid)
    assert all(0.0 <= g["accuracy"] <= 1.0 for g in grid)
    assert first["training_solver"]["solver"] == "euler" and first["training_solver"]["steps"] == n0
    assert first["training_nfe"] == n0
    # The rule, recomputed from the grid, gives the reported verdict.
    stronger = [g for g in grid if g["nfe"] > n0]
    assert [g["stronger"] for g in grid] == [g["nfe"] > n0 for g in grid]
    assert first["smooth"] == all(g["accuracy"] >= first["training_accuracy"] - 0.01 for g in stronger)
    assert "tolerance" in first["rule"] and isinstance(first["smooth"], bool)
    # Same model, same data, same answer.
    assert first["grid"] == again["grid"] and first["smooth"] == again["smooth"]
    assert first["samples"] == 100
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    # Training accuracy is the accuracy with the training solver itself.
    same = next(g for g in grid if g["solver"] == "euler" and g["n"] == n0)
    assert same["accuracy"] == first["training_accuracy"] and not same["stronger"]


def test_library_restores_the_training_solver(trained: dict[int, Path]) -> None:
    from odekit.io.checkpoints import load_model

    loaded = load_model(trained[2])
    data = load_dataset("digits")
    before = ode_blocks(loaded.model)[0].config
    settings = SmoothnessSettings(("rk4",), (1, 2), tolerance=0.99)
    result = smoothness_check(loaded.model, data.test.subset(50), settings, torch.device("cpu"))
    assert ode_blocks(loaded.model)[0].config == before
    assert [g.nfe for g in result.grid] == [4, 8] and result.stronger_configs == 2
    assert result.smooth  # a 99-point tolerance forgives any drop


def test_non_ode_checkpoint_is_a_one_line_error(cli: Cli, tmp_path: Path) -> None:
    result = cli.invoke(["smoothness-check", str(ROOT / "checkpoints" / "lenet5_digits.safetensors"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "no ODE block" in result.stderr
    assert not (tmp_path / "x" / "report.json").exists() and not (tmp_path / "x" / "grid.png").exists()


def test_cnf_is_refused() -> None:
    from odekit.methods.smoothness import training_config

    with pytest.raises(UnsupportedModelError, match="density"):
        training_config(build_model("cnf", {}))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--solvers", "euler,heun3"], "unknown solver 'heun3'"),
        (["--solvers", "dopri5"], "adaptive"),
        (["--u", "1.5"], "(0, 1]"),
        (["--u", "0"], "(0, 1]"),
        (["--steps", "2,x"], "--steps"),
        (["--steps", "1,2"], "no tested"),  # with --solvers euler: nothing beats Euler n=2
    ],
)
def test_bad_options_exit_one_with_one_line(cli: Cli, trained: dict[int, Path], tmp_path: Path, args: list[str], needle: str) -> None:
    extra = ["--solvers", "euler"] if args[0] == "--steps" and args[1] == "1,2" else []
    result = cli.invoke(["smoothness-check", str(trained[2]), *extra, *args, "--eval-samples", "20", "-o", str(tmp_path / "y")])
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0]
    assert not (tmp_path / "y" / "report.json").exists()


def test_settings_validate_themselves() -> None:
    assert SmoothnessSettings(("RK4", "rk4", "euler"), (8, 2, 2)).solvers == ("rk4", "euler")
    assert SmoothnessSettings(steps=(8, 2, 2)).steps == (2, 8)
    with pytest.raises(UsageError):
        SmoothnessSettings(tolerance=1.5)
    with pytest.raises(UsageError):
        SmoothnessSettings(steps=(0,))
    assert json.dumps(SmoothnessSettings().__dict__)
