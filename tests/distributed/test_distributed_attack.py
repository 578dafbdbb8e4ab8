"""`odekit attack` under torchrun (issue 15): active-subspace and random universal attacks fit on
a sharded fit set and score a sharded test split, with the numbers of one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rank_spawner import ROOT, spawn_ranks  # noqa: E402

WORKER = str(HERE / "_worker.py")
LENET = ROOT / "checkpoints" / "lenet300_digits.safetensors"


def _same_up_to_sign(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative distance of a and b, the sign of b chosen to match a."""
    a, b = a.flatten().double(), b.flatten().double()
    return float(min((a - b).norm(), (a + b).norm()) / a.norm())


def test_two_ranks_attack_matches_one_process(tmp_path: Path) -> None:
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        out.mkdir()
        run = spawn_ranks([WORKER, "attack", str(out)], world=world)
        assert run.returncodes == [0] * world, run.stderr
        runs[world] = torch.load(out / "result.pt", weights_only=False)
    one, two = runs[1], runs[2]
    # the first AS direction: SVD of the stacked gradients vs summed Gram matrices
    assert float(one["v_first"].norm()) > 0
    assert _same_up_to_sign(one["v_first"], two["v_first"]) < 1e-5
    assert _same_up_to_sign(one["v_as"], two["v_as"]) < 1e-5
    assert two["history_as"] == one["history_as"]
    assert two["fit_as"] == one["fit_as"] and two["fit_random"] == one["fit_random"]
    assert torch.equal(one["v_random"], two["v_random"])  # the same seed on every rank
    for name in ("as", "random"):
        assert two["scores"][name] == one["scores"][name]
        assert two["scores"][name]["n"] == 251
    assert one["scores"]["as"]["fooling_rate"] > one["scores"]["random"]["fooling_rate"]
    # per-sample: shards attacked separately and gathered in order
    assert two["x_adv_fgsm"].shape == one["x_adv_fgsm"].shape == (251, *one["x_adv_fgsm"].shape[1:])
    assert torch.allclose(two["x_adv_fgsm"], one["x_adv_fgsm"], atol=1e-6)
    assert torch.allclose(two["sizes_fgsm"], one["sizes_fgsm"], atol=1e-6)
    assert two["scores"]["fgsm"] == one["scores"]["fgsm"]
    assert one["scores"]["fgsm"]["robust_accuracy"] < one["scores"]["fgsm"]["clean_accuracy"]


def test_uap_and_matrix_runs_refuse_several_ranks(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from odekit.cli.app import app

    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    out = tmp_path / "out"
    for args in ([str(LENET), "--method", "uap"], ["--matrix", str(LENET), str(LENET)]):
        result = CliRunner().invoke(app, ["attack", *args, "--out", str(out)], env=env)
        assert result.exit_code == 1
        assert "does not split its work over ranks (2 were launched)" in result.stderr
        assert not out.exists()


ATTACK = ["-m", "odekit", "attack", str(LENET), "--method", "active-subspace", "--delta", "3",
          "--max-iters", "5", "--fit-samples", "200", "--threads", "1", "--json"]  # fmt: skip


@pytest.mark.slow
def test_two_ranks_attack_cli_agrees_with_one_process(tmp_path: Path) -> None:
    two = spawn_ranks([*ATTACK, "--out", str(tmp_path / "two")], world=2)
    assert two.returncodes == [0, 0], two.stderr
    one = spawn_ranks([*ATTACK, "--out", str(tmp_path / "one")], world=1)
    assert one.returncodes == [0], one.stderr
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    assert (r2["world_size"], r2["backend"]) == (2, "gloo")
    res1, res2 = r1["results"], r2["results"]
    for key in ("fooling_rate_test", "fooling_rate_fit", "robust_accuracy", "clean_accuracy",
                "test_samples", "fit_samples", "history_fit"):
        assert res2[key] == res1[key], key
    assert res2["fooling_rate_test"] > 0.2
    assert res2["mean_effective_norm_pixel"] == pytest.approx(res1["mean_effective_norm_pixel"], rel=1e-5)
    assert (tmp_path / "two" / "perturbation.safetensors").exists()


FGSM = ["-m", "odekit", "attack", str(LENET), "--method", "fgsm", "--eps", "0.05,0.1",
        "--eval-samples", "301", "--threads", "1", "--json"]  # fmt: skip


@pytest.mark.slow
def test_two_ranks_per_sample_attack_cli_agrees_with_one_process(tmp_path: Path) -> None:
    two = spawn_ranks([*FGSM, "--out", str(tmp_path / "two")], world=2)
    assert two.returncodes == [0, 0], two.stderr
    one = spawn_ranks([*FGSM, "--out", str(tmp_path / "one")], world=1)
    assert one.returncodes == [0], one.stderr
    res1 = json.loads((tmp_path / "one" / "report.json").read_text())["results"]
    res2 = json.loads((tmp_path / "two" / "report.json").read_text())["results"]
    for key in ("robust_accuracy", "fooling_rate_test", "clean_accuracy", "test_samples"):
        assert res2[key] == res1[key], key
    assert res2["test_samples"] == 301 and res2["robust_accuracy"][1] < res2["clean_accuracy"]
