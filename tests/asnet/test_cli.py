"""`odekit asnet` end to end on the shipped digits checkpoints."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.io.checkpoints import load_model
from odekit.io.datasets import load_dataset
from odekit.methods.evaluation import accuracy


def _run(args: list[str]):
    return CliRunner().invoke(app, ["asnet", *args])


def test_vgg_asnet_end_to_end(checkpoints_dir, tmp_path) -> None:
    out = tmp_path / "run"
    ckpt = checkpoints_dir / "vgg11_digits.safetensors"
    result = _run([str(ckpt), "--cut", "4", "--rank", "8", "--samples", "200", "--no-baselines", "--no-latency",
                   "--device", "cpu", "-o", str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    r = report["results"]
    for key in ("teacher", "asnet"):
        assert {"accuracy", "storage_mb", "flops", "params"} <= set(r[key])
    assert "accuracy_before_finetune" in r["asnet"]
    assert r["cut"]["n_l"] == 1024 and r["cut"]["rank"] == 8 and r["cut"]["n_basis"] == 45
    assert r["storage_reduction"] == pytest.approx(r["teacher"]["storage_mb"] / r["asnet"]["storage_mb"])
    assert r["storage_reduction"] > 5 and r["flop_reduction"] > 1.5
    split = r["split"]
    assert split["pre_model"]["params"] + split["as_pce"]["params"] == r["asnet"]["params"]
    assert split["pre_model"]["flops"] + split["as_pce"]["flops"] == r["asnet"]["flops"]
    assert split["post_storage_reduction"] > 10
    assert r["baselines"] == {"as_pce": r["asnet"]["accuracy_before_finetune"]}
    assert r["active_neurons"]["4"] == r["cut"]["active_neurons"] >= 1
    assert r["warnings"] == []  # 200 samples >= 2 x 45
    assert r["asnet"]["accuracy"] > r["teacher"]["accuracy"] - 0.05
    for name in ("asnet.safetensors", "spectrum.png", "report.json", "report.md"):
        assert (out / name).stat().st_size > 0
    # the ASNet is an ordinary odekit checkpoint with the accuracy the report claims
    loaded = load_model(out / "asnet.safetensors")
    assert loaded.meta.arch == "asnet" and loaded.meta.args["teacher_arch"] == "vgg11_bn"
    assert loaded.meta.history[-1]["command"] == "asnet"
    data = load_dataset("digits", input_shape=loaded.meta.input_shape, normalization=loaded.meta.normalization)
    assert accuracy(loaded.model, data.test) == pytest.approx(r["asnet"]["accuracy"], abs=1e-6)
    for key in ("teacher", "asnet"):  # issue 12: n and a Wilson 95% interval
        low, high = r[key]["accuracy_ci95"]
        assert r[key]["accuracy_n"] == len(data.test) and low <= r[key]["accuracy"] <= high
    assert f"n={len(data.test)}" in (out / "report.md").read_text()
    info = CliRunner().invoke(app, ["info", str(out / "asnet.safetensors"), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["params"] == r["asnet"]["params"]
    attack = CliRunner().invoke(app, ["attack", str(out / "asnet.safetensors"), "--method", "fgsm", "--eps", "8/255",
                                      "--device", "cpu", "-o", str(tmp_path / "attack"), "--json"])  # fmt: skip
    assert attack.exit_code == 0, attack.stderr
    attacked = json.loads(attack.stdout)["results"]
    assert attacked["clean_accuracy"] == pytest.approx(r["asnet"]["accuracy"], abs=1e-6)
    assert attacked["robust_accuracy"][0] <= attacked["clean_accuracy"]


def test_finetune_sparse_and_pce_warning(checkpoints_dir, tmp_path) -> None:
    ckpt = checkpoints_dir / "lenet300_digits.safetensors"
    result = _run([str(ckpt), "--cut", "1", "--rank", "12", "--samples", "150", "--finetune", "1", "--lr", "1e-3",
                   "--head-lr", "1e-5", "--sparse", "--l1", "20", "--no-baselines", "--no-latency", "--device", "cpu", "-o", str(tmp_path / "s"),
                   "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)["results"]
    # 150 samples < 2 x C(14, 2) = 182: the report and the log say so
    assert len(r["warnings"]) == 1 and "182" in r["warnings"][0]
    assert "Warning" in result.stderr and "182" in result.stderr
    assert r["finetune"]["epochs"] == 1 and [e["epoch"] for e in r["finetune"]["history"]] == [0, 1]
    assert r["finetune"]["selection"]["best_epoch"] == 1  # ASNet-s: only trained (sparse) epochs compete
    assert (r["finetune"]["lr"], r["finetune"]["head_lr"]) == (1e-3, 1e-5)
    assert r["asnet"]["nonzero_params"] < r["asnet"]["params"]
    assert 0 < r["asnet"]["density"] < 1
    assert r["asnet"]["flops_nonzero"] < r["asnet"]["flops"]
    assert "baselines.png" not in {p.name for p in (tmp_path / "s").iterdir()}


def test_analyze_reports_every_layer(checkpoints_dir, tmp_path) -> None:
    ckpt = checkpoints_dir / "lenet300_digits.safetensors"
    result = _run([str(ckpt), "--analyze", "--samples", "200", "--device", "cpu", "-o", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)["results"]
    assert [layer["index"] for layer in r["layers"]] == [1, 2]  # layer 3 is the output layer
    assert [layer["n_l"] for layer in r["layers"]] == [300, 100]
    # before the last linear layer the gradients span at most K - 1 = 9 directions
    assert 1 <= r["active_neurons"]["2"] <= 9
    for layer in r["layers"]:
        assert 0.5 < layer["logreg_accuracy"] <= 1.0
        assert layer["singular_values"] == sorted(layer["singular_values"], reverse=True)
    assert (tmp_path / "a" / "spectrum.png").exists() and not (tmp_path / "a" / "asnet.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        ([], 1, "nothing to do"),
        (["--analyze", "--finetune", "2"], 1, "--cut"),
        (["--cut", "2", "--rank", "zero"], 1, "--rank"),
        (["--cut", "2", "--sparse"], 1, "--finetune"),
        (["--cut", "2", "--finetune", "1", "--head-lr", "0"], 1, "--head-lr"),
        (["--cut", "2", "--energy-tol", "1.5"], 1, "got 1.5"),
        (["--cut", "3"], 1, "last compute layer"),
        (["--cut", "2", "--rank", "500"], 1, "exceeds"),
        (["--cut", "2", "--degree", "two"], 2, "Usage"),  # the parser's own type error
    ],
)
def test_user_errors_give_one_line_and_no_output(checkpoints_dir, tmp_path, args, code, text) -> None:
    out = tmp_path / "err"
    result = _run([str(checkpoints_dir / "lenet300_digits.safetensors"), *args, "--fit-samples", "50", "-o", str(out)])
    assert result.exit_code == code, result.stderr
    assert text in result.stderr and "Traceback" not in result.stderr
    if code == 1:  # odekit's own errors: one line; exit 2 is Typer's parser (its own box)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Hint: " in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_existing_outputs_are_not_overwritten(checkpoints_dir, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "asnet.safetensors").write_bytes(b"keep me")
    result = _run([str(checkpoints_dir / "lenet300_digits.safetensors"), "--cut", "1", "-o", str(out)])
    assert result.exit_code == 1 and "exists" in result.stderr
    assert (out / "asnet.safetensors").read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["asnet.safetensors"]


def test_rank_auto_baselines_and_latency(checkpoints_dir, tmp_path) -> None:
    out = tmp_path / "auto"
    result = _run([str(checkpoints_dir / "lenet300_digits.safetensors"), "--cut", "fc2", "--rank", "auto", "--samples",
                   "300", "--device", "cpu", "-o", str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)["results"]
    assert r["cut"]["rank"] == r["cut"]["active_neurons"] == r["active_neurons"]["2"] <= 9
    assert r["cut"]["eps_at_rank"] <= 0.05 * 2  # eq. 6.17 keeps (1 - eps)^2 of the energy
    base = r["baselines"]
    assert base["as_pce"] == r["asnet"]["accuracy_before_finetune"]
    for key in ("pca_pce", "as_logreg", "pca_logreg", "logreg_features"):
        assert 0.1 <= base[key] <= 1.0
    assert base["rank"] == r["cut"]["rank"]
    assert set(r["latency_ms"]) == {"teacher_ms_batch1", "asnet_ms_batch1", "teacher_ms_batch256", "asnet_ms_batch256"}
    assert all(v > 0 for v in r["latency_ms"].values())
    assert r["latency"]["batch256"]["batch_size"] == 256
    assert r["latency"]["batch1"]["teacher"]["median_ms_per_batch_of_1"] == r["latency_ms"]["teacher_ms_batch1"]
    assert abs(r["teacher"]["accuracy"] - r["asnet"]["accuracy"]) <= 1.0 - r["agreement"] + 1e-9
    assert r["mean_kl"] >= -1e-9
    assert (out / "baselines.png").stat().st_size > 0


@pytest.mark.slow
def test_vgg_goal_five_times_smaller_within_two_points(checkpoints_dir, tmp_path) -> None:
    """The issue's goal, with every default on (baselines, latency) and distillation fine-tuning."""
    result = _run([str(checkpoints_dir / "vgg11_digits.safetensors"), "--cut", "4", "--rank", "8", "--finetune", "3",
                   "-o", str(tmp_path / "goal"), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)["results"]
    assert r["storage_reduction"] >= 5
    assert r["accuracy_drop_points"] <= 2
    assert r["baselines"]["as_pce"] >= r["baselines"]["pca_pce"] - 0.01
    assert r["latency_ms"]["asnet_ms_batch1"] > 0


def test_baselines_figure_states_n_and_starts_at_zero() -> None:
    """issue 12: the bars share a 0-100% axis and the title names the test images behind them."""
    import matplotlib.pyplot as plt

    from odekit.api.asnet_figures import baselines_figure as _baselines_figure

    results = {"baselines": {"as_pce": 0.93, "pca_pce": 0.9}, "teacher": {"accuracy": 0.97, "accuracy_n": 360},
               "cut": {"index": 2, "rank": 10}}  # fmt: skip
    fig = _baselines_figure([], results)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 100.0 and "n = 360 test images" in ax.get_title()
    plt.close(fig)


def test_asnet_warns_when_far_below_its_own_baselines() -> None:
    from odekit.methods.asnet import Baselines
    from odekit.methods.asnet.build import _baseline_warning

    baselines = Baselines(as_pce=0.73, pca_pce=0.6, as_logreg=0.8, pca_logreg=0.7, logreg_features=0.95)
    (line,) = _baseline_warning(0.367, baselines, tuned=True)
    assert "fine-tuned ASNet reaches 36.7%" in line and "'logreg_features' baseline (95.0%)" in line and "`rank`" in line  # the CLI shows it as --rank
    assert _baseline_warning(0.92, baselines, tuned=True) == []  # within 5 points
    assert _baseline_warning(0.5, Baselines(as_pce=0.5), tuned=False) == []  # baselines skipped
