"""`odekit reduce` end to end on the shipped digits checkpoints."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.io.checkpoints import load_model
from odekit.io.datasets import load_dataset
from odekit.methods.evaluation import accuracy
from odekit.methods.ron import RonSettings, build_student
from odekit.models.layers import total_flops

COST_KEYS = {"accuracy", "flops", "params", "latency_ms"}


def _run(args: list[str]):
    """The thesis' region RON (these tests check its per-layer report; auto may pick the channel mode)."""
    mode = [] if "--mode" in args or "--layers" not in args else ["--mode", "region"]
    return CliRunner().invoke(app, ["reduce", *args, *mode])


def _check_report(report: dict, out) -> dict:
    r = report["results"]
    for key in ("teacher", "student"):
        assert set(r[key]) >= COST_KEYS
        assert r[key]["latency_ms"] > 0
    assert r["flop_reduction"] == pytest.approx(r["teacher"]["flops"] / r["student"]["flops"])
    assert r["accuracy_drop"] == pytest.approx(r["teacher"]["accuracy"] - r["student"]["accuracy"])
    assert r["ranks"] == [layer["rank"] for layer in r["layers"]]
    for layer in r["layers"]:
        assert layer["rank"] <= layer["rows"] <= layer["dim"]
        assert layer["error_factor"] >= 1.0 and layer["amplification"] >= 1.0 - 1e-6
        sv = layer["singular_values_normalized"]
        assert sv[0] == pytest.approx(1.0) and all(a >= b - 1e-9 for a, b in itertools.pairwise(sv))
    assert r["reload_max_abs_diff"] == 0.0
    # agreement bounds the accuracy gap: both count the same test samples
    assert 0.0 <= r["agreement"] <= 1.0 and r["mean_kl"] >= -1e-9
    assert abs(r["accuracy_drop"]) <= 1.0 - r["agreement"] + 1e-9
    latency, batch = r["latency"], r["latency"]["batch_size"]
    assert latency["teacher"][f"median_ms_per_batch_of_{batch}"] == pytest.approx(r["teacher"]["latency_ms"])
    assert latency["student"]["median_ms_per_sample"] == pytest.approx(r["student"]["latency_ms"] / batch)
    assert r["latency_speedup"] == pytest.approx(r["teacher"]["latency_ms"] / r["student"]["latency_ms"])
    assert (out / "singular_values.png").stat().st_size > 1000
    assert (out / "report.md").exists()
    for key in ("teacher", "student"):  # issue 12: n and a Wilson 95% interval with every accuracy
        low, high = r[key]["accuracy_ci95"]
        assert r[key]["accuracy_n"] == r["teacher"]["accuracy_n"] > 0
        assert 0.0 <= low <= r[key]["accuracy"] <= high <= 1.0 and high - low > 1.0 / r[key]["accuracy_n"]
    assert all(layer["rank_at_sketch_limit"] is False for layer in r["layers"])
    if any(len(layer["singular_values_normalized"]) > 32 for layer in r["layers"]):  # issue 12: not inline
        assert "arrays.csv" in report["outputs"] and "[arrays.csv](arrays.csv)" in (out / "report.md").read_text()
    return r


def test_lenet300_reduce_end_to_end(checkpoints_dir, tmp_path):
    out = tmp_path / "run"
    ckpt = checkpoints_dir / "lenet300_digits.safetensors"
    result = _run([str(ckpt), "--layers", "1-3", "--rank", "40,40,10", "--samples", "400", "--finetune", "1",
                   "--latency-batch", "16", "--device", "cpu", "-o", str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    r = _check_report(json.loads(result.stdout), out)
    assert r["ranks"] == [40, 40, 10] and r["rows"] == [60, 60, 10]
    # fc1 sampled to 60 rows dominates: 2 (784 x 60 + 60 x 60 + 60 x 10) FLOPs, logits map folded
    assert r["student"]["flops"] == 2 * (784 * 60 + 60 * 60 + 60 * 10)
    assert r["flop_reduction"] > 5.0
    assert r["accuracy_drop"] < 0.03
    student = load_model(out / "student.safetensors")
    assert student.meta.arch == "ron_student" and student.meta.history[-1]["command"] == "reduce"
    data = load_dataset("digits", input_shape=(1, 28, 28), normalization=student.meta.normalization)
    assert accuracy(student.model, data.test) == pytest.approx(r["student"]["accuracy"])
    assert total_flops(student.model, (1, 28, 28)) == r["student"]["flops"]
    # issue 21: per-epoch history on a validation split, the kept epoch at least as good as the untuned one
    ft = r["finetune"]
    assert [e["epoch"] for e in ft["epochs"]] == [0, 1] and ft["validation_samples"] == 144
    kept = ft["epochs"][ft["best_epoch"]]
    assert kept["val_accuracy"] >= ft["epochs"][0]["val_accuracy"]
    assert r["student"]["accuracy"] == pytest.approx(kept["test_accuracy"])
    assert r["student"]["accuracy_before_finetune"] == pytest.approx(ft["epochs"][0]["test_accuracy"])
    assert (out / "finetune_history.png").stat().st_size > 1000
    assert "Fine-tuning per epoch" in (out / "report.md").read_text()


@pytest.mark.slow
def test_vgg_reduce_end_to_end_with_pooling(checkpoints_dir, tmp_path):
    out = tmp_path / "run"
    ckpt = checkpoints_dir / "vgg11_digits.safetensors"
    result = _run([str(ckpt), "--layers", "7-8", "--rank", "16", "--samples", "200", "--latency-batch", "4",
                   "--device", "cpu", "-o", str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    r = _check_report(json.loads(result.stdout), out)
    assert [layer["layers"] for layer in r["layers"]] == [["conv7"], ["conv8"]]
    assert [layer["pooled"] for layer in r["layers"]] == [
        False,
        True,
    ]  # conv8 -> BN -> ReLU -> max-pool
    assert [layer["dim"] for layer in r["layers"]] == [512, 128]
    assert r["ranks"] == [16, 16] and r["rows"] == [24, 24]
    assert r["flop_reduction"] > 1.1
    assert r["accuracy_drop"] < 0.05
    student = load_model(out / "student.safetensors").model
    teacher = load_model(ckpt).model
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert student(x).shape == teacher(x).shape == (3, 10)


def _shipped_student(path, layers: str, rank: str, n_fit: int, n_test: int | None = None):
    """Student of a shipped 32x32 checkpoint; returns it, the teacher's FLOPs ratio and the
    fraction of test digits on which student and teacher agree."""
    loaded = load_model(path)
    data = load_dataset("digits", input_shape=(1, 32, 32), normalization=loaded.meta.normalization)
    res = build_student(
        loaded.model, loaded.meta.arch, loaded.meta.args, (1, 32, 32), data.train.x[:n_fit],
        RonSettings(layers=layers, rank=rank),
    )  # fmt: skip
    flops = total_flops(res.student, (1, 32, 32)) / total_flops(loaded.model, (1, 32, 32))
    x = data.test.x[:n_test]
    with torch.no_grad():
        agree = float((res.student(x).argmax(1) == loaded.model(x).argmax(1)).float().mean())
    return res, flops, agree


def test_vgg_student_from_shipped_checkpoint(checkpoints_dir):
    """Library-level twin of the (slow) VGG end-to-end test: pooled states, FLOPs, agreement."""
    res, flops, agree = _shipped_student(checkpoints_dir / "vgg11_digits.safetensors",
                                         "conv7-conv8", "16", 150, 120)
    assert [r.layers for r in res.layers] == [["conv7"], ["conv8"]]
    assert [r.pooled for r in res.layers] == [False, True]
    assert [r.rows for r in res.layers] == [24, 24]
    assert flops < 1.0 and agree >= 0.95


def test_resnet_student_from_shipped_checkpoint(checkpoints_dir):
    """Residual sums (eq. 5.16) on a trained ResNet-20: each block's second state is rebuilt
    from its input state and its first state, and predictions stay those of the teacher."""
    res, flops, agree = _shipped_student(checkpoints_dir / "resnet20_digits.safetensors",
                                         "conv16-conv19", "24", 300)
    assert [r.layers for r in res.layers] == [["conv16"], ["conv17"], ["conv18"], ["conv19"]]
    assert [len(r.sources) for r in res.layers] == [1, 2, 1, 2]  # skip connection + block
    assert res.layers[1].sources[1] == res.layers[0].state
    assert flops < 0.8 and agree >= 0.95


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--layers", "1-3", "--rank", "bogus"], 1, "unknown rank rule"),
        (["--layers", "1-3", "--rank", "500"], 1, "exceeds the layer dimension"),
        (["--layers", "1-2", "--rank", "50", "--samples", "20"], 1, "needs at least 50 samples"),
        (["--layers", "3-1"], 1, "backwards"),
        (["--layers", "1-3", "--oversample", "0.5"], 1, "oversample"),
    ],
)
def test_reduce_bad_inputs(checkpoints_dir, tmp_path, args, code, needle):
    ckpt = checkpoints_dir / "lenet300_digits.safetensors"
    result = _run([str(ckpt), *args, "--device", "cpu", "-o", str(tmp_path / "run")])
    assert result.exit_code == code, result.stdout + result.stderr
    assert needle in result.stderr and "Error:" in result.stderr
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_ranks_clipped_by_the_sketch_size_are_flagged(checkpoints_dir, tmp_path):
    """issue 12: an 8-row sketch of fc1's 300 outputs holds 7 directions; rank 7 uses them all, vbmf does not."""
    out = tmp_path / "clip"
    result = _run([str(checkpoints_dir / "lenet300_digits.safetensors"), "--layers", "1-1", "--rank", "7",
                   "--sketch-size", "8", "--fit-samples", "200", "--latency-batch", "4", "-o", str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)["results"]
    assert r["ranks"] == [7] and r["layers"][0]["rank_at_sketch_limit"] is True
    assert "sit at the sketch size limit" in result.stderr
    n = r["student"]["accuracy_n"]
    low, high = r["student"]["accuracy_ci95"]
    assert n == 360 and low <= r["student"]["accuracy"] <= high  # digits' test split
