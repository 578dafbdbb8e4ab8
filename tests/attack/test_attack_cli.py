"""`odekit attack` end to end: JSON keys, files, transfer matrix, grey-box, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from odekit.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["attack", *map(str, args)])


def results(res) -> dict:
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)["results"]


def test_active_subspace_report_vector_and_figure(tmp_path, lenet300_path):
    out = tmp_path / "as"
    r = results(
        invoke(
            lenet300_path,
            "--method",
            "active-subspace",
            "--delta",
            "3",
            "--fit-samples",
            "40",
            "--eval-samples",
            "80",
            "--max-iter",
            "6",
            "-o",
            out,
            "--json",
        )
    )
    for key in (
        "method",
        "norm",
        "delta",
        "clean_accuracy",
        "robust_accuracy",
        "fooling_rate_fit",
        "fooling_rate_test",
        "seconds",
        "perturbation_path",
        "norm_pixel",
        "norm_model",
    ):
        assert key in r
    assert r["method"] == "active-subspace" and r["norm"] == "2" and r["delta"] == 3.0
    assert r["norm_pixel"] <= 3.0 * (1 + 1e-5)
    std = 0.32470476627349854  # the checkpoint's recorded normalisation
    assert r["norm_model"] == pytest.approx(r["norm_pixel"] / std, rel=1e-4)
    assert r["fooling_rate_test"] > 0.1
    assert r["robust_accuracy"] < r["clean_accuracy"]
    assert (out / "attack.png").stat().st_size > 1000
    with safe_open(r["perturbation_path"], "pt") as f:
        meta = json.loads(f.metadata()["odekit_attack"])
        v_model, v_pixel = f.get_tensor("perturbation"), f.get_tensor("perturbation_pixel")
    assert meta["method"] == "active-subspace" and len(meta["model_sha256"]) == 64
    assert v_pixel.shape == (1, 28, 28)
    assert float(v_pixel.norm()) == pytest.approx(r["norm_pixel"], rel=1e-5)
    assert torch.allclose(v_model * std, v_pixel, atol=1e-6)


def test_per_sample_eps_list_gives_a_curve(tmp_path, lenet300_path):
    r = results(
        invoke(
            lenet300_path,
            "--method",
            "pgd",
            "--norm",
            "inf",
            "--eps",
            "0.02,8/255,0.1",
            "--backend",
            "torch",
            "--steps",
            "5",
            "--eval-samples",
            "60",
            "-o",
            tmp_path / "pgd",
            "--json",
        )
    )
    assert r["eps"] == pytest.approx([0.02, 8 / 255, 0.1])
    assert len(r["robust_accuracy"]) == 3 and len(r["fooling_rate_test"]) == 3
    assert r["fooling_rate_fit"] is None
    assert r["robust_accuracy"][2] < r["robust_accuracy"][0] <= r["clean_accuracy"]
    assert all(p["max_size"] <= p["eps"] * (1 + 1e-5) for p in r["curve"])
    assert (tmp_path / "pgd" / "robust_accuracy.png").exists()


def test_default_budgets_follow_robustbench(tmp_path, lenet300_path):
    r = results(
        invoke(
            lenet300_path,
            "--method",
            "fgsm",
            "--norm",
            "inf",
            "--backend",
            "torch",
            "--eval-samples",
            "20",
            "-o",
            tmp_path / "a",
            "--json",
        )
    )
    assert r["eps"] == pytest.approx([8 / 255])
    r = results(
        invoke(
            lenet300_path,
            "--method",
            "fgsm",
            "--norm",
            "2",
            "--backend",
            "torch",
            "--eval-samples",
            "20",
            "-o",
            tmp_path / "b",
            "--json",
        )
    )
    assert r["eps"] == pytest.approx([0.5])


def test_matrix_diagonal_equals_white_box(tmp_path, lenet300_path, lenet5_path):
    common = [
        "--method",
        "fgsm",
        "--norm",
        "inf",
        "--eps",
        "0.1",
        "--backend",
        "torch",
        "--eval-samples",
        "50",
        "--json",
    ]
    m = results(invoke("--matrix", lenet300_path, lenet5_path, *common, "-o", tmp_path / "m"))[
        "matrix"
    ]
    assert m["sources"] == m["targets"] == ["lenet300_digits", "lenet5_digits"]
    for row, ci_row in zip(m["fooling_rate"], m["fooling_rate_ci95"], strict=True):
        assert all(low <= rate <= high for rate, (low, high) in zip(row, ci_row, strict=True))
    for i, path in enumerate((lenet300_path, lenet5_path)):
        white = results(invoke(path, *common, "-o", tmp_path / f"w{i}"))
        assert m["fooling_rate"][i][i] == pytest.approx(white["fooling_rate_test"][0], abs=1e-9)
        assert m["robust_accuracy"][i][i] == pytest.approx(white["robust_accuracy"][0], abs=1e-9)
    # black-box transfer through --source equals the off-diagonal entry
    t = results(invoke(lenet5_path, "--source", lenet300_path, *common, "-o", tmp_path / "t"))
    assert t["mode"] == "black-box transfer"
    assert m["fooling_rate"][0][1] == pytest.approx(t["fooling_rate_test"][0], abs=1e-9)


def test_grey_box_solver_transfer(tmp_path, odenet_path):
    r = results(
        invoke(
            odenet_path,
            "--method",
            "fgsm",
            "--norm",
            "inf",
            "--eps",
            "0.1",
            "--backend",
            "torch",
            "--attack-solver",
            "euler:2",
            "--eval-solver",
            "rk4:4",
            "--eval-samples",
            "30",
            "-o",
            tmp_path / "g",
            "--json",
        )
    )
    assert r["mode"] == "grey-box (solver transfer)"
    assert "source_robust_accuracy" in r["curve"][0]
    same = results(
        invoke(
            odenet_path,
            "--method",
            "fgsm",
            "--norm",
            "inf",
            "--eps",
            "0.1",
            "--backend",
            "torch",
            "--attack-solver",
            "euler:2",
            "--eval-solver",
            "euler:2",
            "--eval-samples",
            "30",
            "-o",
            tmp_path / "s",
            "--json",
        )
    )
    # generated with the training solver, evaluated with it: the white-box numbers
    assert same["curve"][0]["source_robust_accuracy"] == pytest.approx(same["robust_accuracy"][0])


def _assert_one_line_error(res, code: int, text: str, out) -> None:
    assert res.exit_code == code, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and text in lines[0]
    assert ". Hint: " in lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "args,code,text",
    [
        (["--method", "fgsm", "--eps", "0"], 1, "positive"),
        (["--method", "pgd", "--eps", "-0.1"], 1, "positive"),
        (["--method", "active-subspace", "--delta", "0"], 1, "delta"),
        (["--norm", "l3"], 1, "unknown norm"),
        (["--method", "cw"], 1, "unknown attack method"),
        (["--method", "fgsm", "--delta", "1"], 1, "--delta is for universal"),
        (["--method", "fgsm", "--attack-solver", "rk2:4"], 1, "no ODE blocks"),
        (["--method", "fgsm", "--attack-solver", "rk9:4"], 1, "unknown solver"),
        (["--method", "fgsm", "--units", "model"], 1, "needs an explicit budget"),
        (["--method", "adef", "--eps", "1", "--units", "model"], 1, "displacements in pixels"),
        (["--method", "fgsm", "--eps", "0.1", "--units", "furlong"], 1, "unknown budget units"),
        # issue 17: non-finite or absurd numbers are one clean line, checked before any work
        (["--method", "fgsm", "--norm", "inf", "--eps", "1e300"], 1, "larger than any linf perturbation"),
        (["--method", "random", "--delta", "1e300"], 1, "larger than any l2 perturbation"),
        (["--method", "fgsm", "--eps", "inf"], 1, "positive and finite"),
        (["--method", "adef", "--sigma", "nan"], 1, "--sigma nan is not a finite number"),
        (["--method", "adef", "--sigma", "inf"], 1, "--sigma inf is not a finite number"),
        (["--method", "active-subspace", "--gamma", "nan"], 1, "gamma"),
        (["--method", "active-subspace", "--s0", "1e300"], 1, "s0 must be at most"),
        (["--method", "uap", "--max-passes", "100000000000"], 1, "max-passes"),
        (["--method", "random", "--target", "10"], 1, "not a class"),
        (["--method", "fgsm", "--target", "1"], 1, "--target is for universal"),
        (["--method", "random", "--seeds", "1,x"], 1, "--seeds"),
    ],
)
def test_bad_options(tmp_path, lenet300_path, args, code, text):
    out = tmp_path / "bad"
    _assert_one_line_error(
        invoke(lenet300_path, *args, "--eval-samples", "10", "-o", out), code, text, out
    )


def test_model_units_scale_budgets_by_the_std(tmp_path, lenet300_path):
    """--units model reads budgets as model-input norms (the thesis' delta) and attacks with
    the equivalent pixel budget: model norm x std for the one-channel digits models."""
    from odekit.io.checkpoints import load_model

    std = load_model(lenet300_path).meta.normalization["std"][0]
    uni = results(invoke(lenet300_path, "--method", "random", "--delta", "9", "--units", "model",
                         "--fit-samples", "20", "--eval-samples", "40", "-o", tmp_path / "u", "--json"))
    assert uni["delta"] == pytest.approx(9 * std) and uni["budget_given"] == 9
    assert uni["norm_model"] == pytest.approx(9, rel=1e-4)
    assert uni["budget_units"] == "model"
    per = results(invoke(lenet300_path, "--method", "fgsm", "--norm", "inf", "--eps", "0.1,0.2",
                         "--units", "model", "--backend", "torch", "--eval-samples", "40",
                         "-o", tmp_path / "p", "--json"))
    assert per["eps"] == pytest.approx([0.1 * std, 0.2 * std]) and per["budget_given"] == [0.1, 0.2]
    assert max(p["max_size"] for p in per["curve"]) <= 0.2 * std + 1e-6


def test_data_outside_bounds_is_one_line_exit_1(tmp_path, lenet300_path):
    data = tmp_path / "bright.npz"
    rng = np.random.default_rng(0)
    np.savez(
        data,
        x=rng.uniform(0, 3, size=(30, 8, 8)).astype(np.float32),
        y=rng.integers(0, 10, size=30),
    )
    out = tmp_path / "bad"
    res = invoke(
        lenet300_path, "--method", "fgsm", "--data", data, "--eval-samples", "5", "-o", out
    )
    _assert_one_line_error(res, 1, "bounds", out)


def test_non_differentiable_model_is_one_line_exit_1(tmp_path):
    class Hard(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(self.fc(x.flatten(1)).argmax(1), 10).float()

    path = tmp_path / "hard.pt"
    torch.jit.save(torch.jit.script(Hard()), str(path))
    out = tmp_path / "bad"
    # stating the preprocessing of a checkpoint without metadata silences the assumption warning
    res = invoke(path, "--method", "fgsm", "--eval-samples", "5", "-o", out, "--normalize", "data", "--input-shape", "1,8,8")
    _assert_one_line_error(res, 1, "differentiable", out)


def test_help_lists_methods():
    res = runner.invoke(app, ["attack", "--help"])
    assert res.exit_code == 0
    for name in ("active-subspace", "uap", "random", "fgsm", "pgd", "deepfool", "adef"):
        assert name in res.stdout


def test_sweep_and_seeds_give_one_report_with_a_curve(tmp_path, lenet300_path):
    out = tmp_path / "sweep"
    r = results(invoke(lenet300_path, "--method", "active-subspace", "--delta", "4,2", "--max-iter", "4",
                       "--fit-samples", "40", "--eval-samples", "80", "--seeds", "0,1", "-o", out,
                       "--json"))  # fmt: skip
    assert r["delta"] == [2.0, 4.0] and len(r["curve"]) == 2
    assert r["budget_handling"] == "fitted once, scaled per budget"
    assert r["fit_seconds"] > 0 and r["seconds"] >= r["fit_seconds"]
    assert all(p["norm_pixel"] <= p["delta"] * (1 + 1e-5) for p in r["curve"])
    assert r["fooling_rate_test"][0] <= r["fooling_rate_test"][1]
    for p in r["curve"]:
        low, high = p["fooling_rate_test_ci95"]
        assert low <= p["fooling_rate_test"] <= high and p["fooling_samples_test"] == 80
    assert r["seeds"] == [0, 1] and len(r["across_seeds"]) == 2
    stats = r["across_seeds"][1]["fooling_rate_test"]
    seed_rates = [s["curve"][1]["fooling_rate_test"] for s in r["per_seed"]]
    assert stats["mean"] == pytest.approx(sum(seed_rates) / 2) and stats["runs"] == 2
    lines = (out / "curve.csv").read_text().splitlines()
    assert lines[0].startswith("delta,fooling_rate_test,ci95_low") and len(lines) == 3
    assert (out / "fooling_rate.png").stat().st_size > 1000
    with safe_open(r["perturbation_path"], "pt") as f:
        assert {"perturbation_0", "perturbation_pixel_1", "perturbation"} <= set(f.keys())


def test_targeted_universal_reports_success_on_other_classes(tmp_path, lenet300_path):
    r = results(invoke(lenet300_path, "--method", "as-k", "--target", "3", "--delta", "3",
                       "--max-iter", "4", "--subspace-steps", "3", "--fit-samples", "40",
                       "--eval-samples", "80", "-o", tmp_path / "t", "--json"))  # fmt: skip
    assert r["target_class"] == 3 and r["fooling_samples_test"] < 80
    assert r["fooling_rate_fit"] >= r["fooling_rate_fit_as"]


def test_huge_solver_step_count_is_refused_before_any_work(tmp_path, odenet_path):
    out = tmp_path / "bad"
    res = invoke(odenet_path, "--method", "fgsm", "--attack-solver", "euler:100000000000",
                 "--eval-samples", "5", "-o", out)  # fmt: skip
    _assert_one_line_error(res, 1, "solver steps must lie in [1, 10000]", out)
    assert "Hint:" in res.stderr


def test_out_of_memory_under_a_solver_spec_blames_the_steps():
    from odekit.errors import UsageError
    from odekit.methods.attacks import parse_solver_spec
    from odekit.methods.attacks.pipeline import solver_memory_guard as _solver_memory_guard

    spec = parse_solver_spec("euler:5000")
    with pytest.raises(UsageError, match="`attack_solver` euler:5000") as info, _solver_memory_guard((spec, None)):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")
    assert "step count" in str(info.value)
    # without a solver spec the runner's own message stays
    with pytest.raises(MemoryError), _solver_memory_guard((None, None)):
        raise MemoryError


@pytest.mark.parametrize(
    ("method", "budget", "applies", "absent"),
    [
        ("active-subspace", ["--delta", "3"], {"max_iters": "max_iter", "fit_samples": "fit_samples"},
         ("max_passes", "sigma", "restarts", "steps", "eps", "target", "backend")),
        ("pgd", ["--eps", "0.1"], {"iters": "steps", "restarts": "restarts"},
         ("max_iter", "max_passes", "sigma", "fit_samples", "delta", "s0", "target")),
    ],
)  # fmt: skip
def test_report_params_list_only_what_the_method_uses(tmp_path, lenet300_path, method, budget, applies, absent):
    """issue 12: new spellings (--iters, --max-iters) work, and the report drops options the method ignores."""
    given = [arg for option, key in applies.items() for arg in (f"--{option.replace('_', '-')}", "2")]
    res = invoke(lenet300_path, "--method", method, *budget, *given, "--eval-samples", "20", "-o", tmp_path / "p", "--json")
    assert res.exit_code == 0, res.stderr
    params = json.loads(res.stdout)["params"]
    assert all(params[key] == 2 for key in applies.values())
    assert not set(absent) & set(params), set(absent) & set(params)
    assert params["method"] == method
