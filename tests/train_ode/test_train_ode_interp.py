"""`train-ode --cheb-nodes auto|N`: irdm's interpolation error in the report, and one stderr
line when a fixed N misses the adjoint tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from odekit.io.checkpoints import load_model
from odekit.models.ode_models import ode_blocks

if TYPE_CHECKING:
    from conftest import Cli

TINY = ["train-ode", "--task", "density", "--data", "pinwheel", "--hidden", "8,8",
        "--train-samples", "200", "--test-samples", "50", "--batch-size", "32", "--solver", "dopri5",
        "--grad", "irdm", "--iters", "2", "--seed", "0"]


def test_auto_is_the_default_and_reports_its_interpolation_error(cli: Cli, tmp_path: Path) -> None:
    result = cli.invoke([*TINY, "--rtol", "1e-5", "--atol", "1e-5", "-o", str(tmp_path / "a"),
                         "--json"])
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout)["results"]
    assert res["solver_config"]["cheb_nodes"] == "auto"
    assert res["interp_tol"] == 1e-5 and 0 <= res["interp_error"] <= res["interp_tol"]
    assert "Warning" not in result.stderr
    config = ode_blocks(load_model(tmp_path / "a" / "model.safetensors").model)[0].config
    assert config.cheb_nodes == "auto"


def test_a_fixed_grid_that_misses_the_tolerance_says_so_once(cli: Cli, tmp_path: Path) -> None:
    result = cli.invoke([*TINY, "--rtol", "1e-6", "--atol", "1e-6", "--cheb-nodes", "2",
                         "-o", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout)["results"]
    assert res["solver_config"]["cheb_nodes"] == 2
    assert res["interp_error"] > res["interp_tol"] == 1e-6
    lines = [line for line in result.stderr.splitlines() if "Warning" in line]
    assert len(lines) == 1 and "--cheb-nodes 2" in lines[0] and "in 2 solves" in lines[0]
    assert "--cheb-nodes auto" in lines[0]


def test_bad_cheb_nodes_fail_with_one_line(cli: Cli, tmp_path: Path) -> None:
    for value in ("1", "lots"):
        result = cli.invoke([*TINY, "--cheb-nodes", value, "-o", str(tmp_path / value)])
        assert result.exit_code == 1
        assert result.stderr.count("Error:") == 1 and "cheb_nodes must be 'auto'" in result.stderr
