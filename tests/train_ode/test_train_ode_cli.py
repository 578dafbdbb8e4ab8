"""`odekit train-ode` end to end on tiny settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from odekit.io.checkpoints import load_model
from odekit.models.ode_models import ode_blocks

if TYPE_CHECKING:
    from conftest import Cli

REPORT_KEYS = {"task", "solver", "grad_method", "final_metrics", "nfe_forward", "nfe_backward", "seconds_per_iter"}


def test_classify_digits_beats_chance_and_records_the_solver(cli: Cli, tmp_path: Path) -> None:
    report = cli.train_tiny(tmp_path / "run", "--solver", "euler", "--steps", "2", "--epochs", "2")
    res = report["results"]
    assert set(res) >= REPORT_KEYS
    assert res["task"] == "classify" and res["solver"] == "euler" and res["grad_method"] == "backprop"
    assert res["final_metrics"]["test_accuracy"] > 0.5  # chance is 0.1
    assert res["nfe_forward"] == 2.0 and res["nfe_backward"] == 0.0
    assert len(res["history"]) == 2 and res["history"][-1]["epoch"] == 2.0
    assert res["iterations"] == 2 * 23  # 1437 training digits in batches of 64
    loaded = load_model(tmp_path / "run" / "model.safetensors")
    config = ode_blocks(loaded.model)[0].config
    assert (config.solver, config.steps, config.grad) == ("euler", 2, "backprop")
    assert loaded.meta.extra["training_solver"]["solver"] == "euler"
    assert loaded.meta.extra["training_nfe_per_solve"] == 2
    assert (tmp_path / "run" / "model.safetensors").stat().st_size < 1_000_000
    for name in ("curves.png", "report.json", "report.md"):
        assert (tmp_path / "run" / name).stat().st_size > 0


def test_adjoint_methods_count_backward_evaluations(cli: Cli, tmp_path: Path) -> None:
    report = cli.train_tiny(tmp_path / "irdm", "--solver", "rk2", "--steps", "2", "--grad", "irdm", "--iters", "3",
                        "--eval-samples", "32")  # fmt: skip
    res = report["results"]
    assert res["grad_method"] == "irdm" and res["iterations"] == 3
    assert res["nfe_forward"] == 4.0 and res["nfe_backward"] == 4.0  # RK2, 2 steps, one block, each way


def test_adjoint_tolerances_are_recorded_in_the_checkpoint(cli: Cli, tmp_path: Path) -> None:
    report = cli.train_tiny(tmp_path / "adj", "--solver", "dopri5", "--rtol", "1e-4", "--atol", "1e-4", "--grad", "irdm",
                        "--adjoint-rtol", "1e-2", "--adjoint-atol", "1e-2", "--seminorm", "--iters", "2",
                        "--eval-samples", "32")  # fmt: skip
    assert report["results"]["nfe_backward"] > 0
    config = ode_blocks(load_model(tmp_path / "adj" / "model.safetensors").model)[0].config
    assert (config.adjoint_rtol, config.adjoint_atol, config.seminorm) == (1e-2, 1e-2, True)


def test_density_nll_decreases(cli: Cli, tmp_path: Path) -> None:
    report = cli.json([
        "train-ode", "--task", "density", "--data", "pinwheel", "--solver", "rk4", "--steps", "2",
        "--hidden", "32,32", "--iters", "40", "--batch-size", "100", "--lr", "1e-2", "--eval-every", "20",
        "--train-samples", "2000", "--test-samples", "500", "-o", str(tmp_path / "cnf"),
    ])  # fmt: skip
    res = report["results"]
    assert set(res) >= REPORT_KEYS and res["task"] == "density"
    nll = [h["test_nll"] for h in res["history"]]
    assert [h["iteration"] for h in res["history"]] == [0, 20, 40]
    assert nll[-1] < nll[0] - 0.3
    fm = res["final_metrics"]
    assert fm["bits_per_dim"] == pytest.approx(fm["test_nll"] / (2 * 0.6931471805599453))
    assert (tmp_path / "cnf" / "density.png").stat().st_size > 0
    loaded = load_model(tmp_path / "cnf" / "model.safetensors")
    assert loaded.meta.arch == "cnf" and loaded.meta.dataset["name"] == "pinwheel"


def test_resume_continues_from_the_checkpoint(cli: Cli, tmp_path: Path) -> None:
    first = cli.train_tiny(tmp_path / "a", "--solver", "euler", "--steps", "1", "--iters", "20", "--lr", "1e-2")
    second = cli.train_tiny(tmp_path / "b", "--resume", str(tmp_path / "a" / "model.safetensors"), "--solver", "euler",
                        "--steps", "1", "--iters", "20", "--lr", "1e-2")  # fmt: skip
    assert second["inputs"]["resume"]["arch"] == "odenet4"
    before = first["results"]["final_metrics"]["test_loss"]
    assert second["results"]["history"][0]["test_loss"] < before + 0.5  # starts from trained weights
    meta = load_model(tmp_path / "b" / "model.safetensors").meta
    assert len(meta.history) == 2 and meta.source_sha256 is not None
    clash = cli.invoke(["train-ode", "--resume", str(tmp_path / "a" / "model.safetensors"), "--width", "64",
                    "--iters", "1", "-o", str(tmp_path / "c")])  # fmt: skip
    assert clash.exit_code == 1 and "contradicts" in clash.stderr


def test_regime_reported_in_the_json(cli: Cli, tmp_path: Path) -> None:
    res = cli.train_tiny(tmp_path / "sw", "--solver", "rk2", "--steps", "1", "--solver-regime", "switching",
                     "--u-set", "0.25,1.0", "--iters", "8", "--eval-samples", "32")["results"]  # fmt: skip
    assert res["regime"]["regime"] == "switching" and res["regime"]["draws"] == 8
    assert sum(res["regime"]["counts"].values()) == 8
    assert set(res["regime"]["first_draws"]) <= {0.25, 1.0}


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--solver", "heun3"], 1, "unknown solver 'heun3'"),
        (["--u", "1.5"], 1, "(0, 1]"),
        (["--u", "0"], 1, "(0, 1]"),
        (["--solver-regime", "smoothing", "--solver", "euler", "--steps", "2"], 1, "rk2"),
        (["--grad", "magic"], 1, "unknown gradient method"),
        (["--solver", "dopri5", "--steps", "4"], 1, "adaptive"),
        (["--task", "density", "--data", "digits"], 1, "not a 2-D toy"),
        (["--data", "moons"], 1, "toy"),
        (["--norm-ode", "group"], 1, "normalization"),
        (["--data", "mnist"], 1, "--data-dir"),
        (["--grad", "irdm", "--solver", "rk2", "--steps", "2", "--adjoint-rtol", "1e-3"], 1, "adaptive solver dopri5"),
        (["--grad", "anode", "--solver", "dopri5", "--seminorm"], 1, "--grad rdm/irdm"),
        (["--grad", "irdm", "--solver", "dopri5", "--adjoint-atol", "0"], 1, "adjoint_atol must be positive"),
    ],
)
def test_bad_inputs_fail_with_one_line(cli: Cli, tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    result = cli.invoke(["train-ode", *args, "--iters", "1", "-o", str(tmp_path / "bad")])
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    assert not (tmp_path / "bad" / "report.json").exists()


def test_resume_of_a_non_ode_checkpoint_is_refused(cli: Cli, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    result = cli.invoke(["train-ode", "--resume", str(root / "checkpoints" / "lenet5_digits.safetensors"),
                     "--iters", "1", "-o", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 1 and "lenet5" in result.stderr
