"""`odekit certify` end to end: report keys and orders, --compare, refusals as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from odekit.cli.app import app

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
runner = CliRunner()
FAST = ["--eval-samples", "24", "--pgd-steps", "3", "--power-iters", "5", "--threads", "1", "--json"]


def invoke(*args: object):
    return runner.invoke(app, ["certify", *map(str, args)])


def test_report_keys_and_accuracy_order(tmp_path):
    res = invoke(CHECKPOINTS / "lenet300_digits.safetensors", "--eps", "0.005,0.05,0.5", "-o", tmp_path / "a", *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)["results"]
    assert r["lipschitz_upper"] > 0 and r["lipschitz_lower_local"] <= r["lipschitz_upper"] * (1 + 1e-9)
    linear = [layer for layer in r["layers"] if layer["kind"] == "linear"]
    assert [layer["index"] for layer in linear] == [1, 2, 3]
    assert all(layer["lipschitz_lower"] <= layer["lipschitz_upper"] for layer in r["layers"])
    assert set(r["certified_accuracy"]) == {"0.005", "0.05", "0.5"}
    for row in r["budgets"]:
        assert row["violations"] == 0 and row["order_holds"]
        assert row["certified_accuracy"]["n"] == 24 and len(row["certified_accuracy"]["ci95"]) == 2
    assert r["clean_accuracy"] >= max(r["robust_accuracy"].values())
    assert (tmp_path / "a" / "certify.png").exists() and (tmp_path / "a" / "report.md").exists()


def test_compare_student_with_teacher(tmp_path):
    res = invoke(CHECKPOINTS / "lenet5_digits.safetensors", "--compare", CHECKPOINTS / "lenet300_digits.safetensors",
                 "--no-attack", "--layers", "1-2", "-o", tmp_path / "c", *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)["results"]
    metrics = {row["metric"]: row for row in r["comparison"]["rows"]}
    lip = metrics["lipschitz_upper"]
    assert lip["student"] == pytest.approx(r["lipschitz_upper"]) and lip["teacher"] == pytest.approx(r["teacher"]["lipschitz_upper"])
    assert lip["ratio"] == pytest.approx(lip["student"] / lip["teacher"])
    assert [layer["index"] for layer in r["selected_layers"]] == [1, 2]
    assert r["robust_accuracy"] == {}


def test_bad_norm_and_ode_nets_fail_in_one_line(tmp_path):
    res = invoke(CHECKPOINTS / "lenet300_digits.safetensors", "--norm", "inf", "-o", tmp_path / "n")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "Error:" in res.stderr and "--norm 2" in res.stderr
    res = invoke(CHECKPOINTS / "odenet4_digits_euler.safetensors", "--no-attack", "-o", tmp_path / "o")
    assert res.exit_code == 1 and res.stderr.startswith("Error:") and res.stderr.count("\n") == 1
    assert "ODE net" in res.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command,args", [
    ("reduce", ["--layers", "1-3", "--rank", "40,40,10", "--samples", "300", "--finetune", "0", "--latency-batch", "8"]),
    ("asnet", ["--cut", "1", "--rank", "4", "--fit-samples", "150", "--no-baselines", "--no-latency"]),
])  # fmt: skip
def test_reduce_and_asnet_certify_the_student_beside_the_teacher(command, args, tmp_path):
    res = runner.invoke(app, [command, str(CHECKPOINTS / "lenet300_digits.safetensors"), *args, "--certify",
                              "--threads", "1", "-o", str(tmp_path / command), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    c = report["results"]["certify"]
    assert report["params"]["certify"] is True
    if command == "asnet":  # the PCE head is a polynomial: no global constant, said in one line
        assert "multiplies" in c["not_certifiable"] and "--certify" in res.stderr
        return
    assert c["student_lipschitz_upper"] > 0 and c["teacher_lipschitz_upper"] > 0
    rows = {row["metric"]: row for row in c["comparison"]["rows"]}
    assert rows["lipschitz_upper"]["ratio"] == pytest.approx(c["student_lipschitz_upper"] / c["teacher_lipschitz_upper"])
    assert set(c["student_certified_accuracy"]) == set(c["teacher_certified_accuracy"])
