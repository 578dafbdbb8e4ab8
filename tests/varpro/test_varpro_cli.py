"""train-ode's VarPro path end to end: regress on CDR / .npz, classify, reload, smoothness, attack."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from odekit.cli.app import app
from odekit.io.cdr import generate_cdr, load_cdr
from odekit.io.checkpoints import load_model
from odekit.methods.varpro.slimtrain import gcv_lambda, sampled_tikhonov

TINY = ["--width", "4", "--depth", "2", "--json"]


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_cdr_is_seeded_cached_and_physical(tmp_path: Path) -> None:
    y, c = generate_cdr(6, grid=16, seed=3)
    assert y.shape == (6, 55) and c.shape == (6, 72)
    assert np.all(c > 0)  # positive sources, zero walls: the maximum principle keeps u > 0 inside
    y2, c2 = generate_cdr(6, grid=16, seed=3)
    assert np.array_equal(c, c2) and np.array_equal(y, y2)
    first = load_cdr(20, grid=16, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("cdr-*.npz"))) == 1
    again = load_cdr(20, grid=16, cache_dir=tmp_path)
    assert torch.equal(first.c_train, again.c_train) and first.x_train.shape == (16, 55)


def test_gcv_picks_small_lambda_for_clean_data_and_large_for_noise() -> None:
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(80, 6, generator=g, dtype=torch.float64)
    W = torch.randn(2, 6, generator=g, dtype=torch.float64)
    clean = fa @ W.T
    U, s, _ = torch.linalg.svd(fa, full_matrices=False)
    noise = torch.randn(80, 2, generator=g, dtype=torch.float64)
    assert gcv_lambda(U, s, clean) < gcv_lambda(U, s, noise)
    W_fit, _ = sampled_tikhonov(fa, clean, torch.zeros_like(W))
    assert torch.allclose(W_fit, W, atol=1e-6)


def test_train_ode_regress_cdr_gnvpro_writes_loadable_model(runner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train-ode", "--task", "regress", "--data", "cdr", "--samples", "120", "--data-dir", str(tmp_path / "cache"),
            "--optimizer", "gnvpro", "--iters", "3", "--compare", "adam", "--epochs", "2", "-o", str(out), *TINY]  # fmt: skip
    res = _json(runner.invoke(app, args))["results"]
    hist = res["history"]
    assert res["optimizer"] == "gnvpro" and set(res["optimizers"]) == {"gnvpro", "adam"}
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(b["work_units"] > a["work_units"] for a, b in itertools.pairwise(hist))
    assert res["optimizers"]["adam"]["work_units"] == 4.0  # 2 epochs x (forward + backward)
    assert (out / "convergence.png").stat().st_size > 0
    loaded = load_model(out / "model.safetensors")
    data = load_cdr(120, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        pred = loaded.model(data.x_test)
    mean = torch.tensor(data.target_mean)
    std = torch.tensor(data.target_std)
    rel = float(((pred - data.c_test) / std).norm() / ((data.c_test - mean) / std).norm())
    assert abs(rel - res["final_metrics"]["test_rel_error"]) < 1e-4  # outputs are in original units


def test_train_ode_regress_npz_slimtrain(runner, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3))
    np.savez(tmp_path / "toy.npz", x=x, y=np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1))
    args = ["train-ode", "--task", "regress", "--data", str(tmp_path / "toy.npz"), "--optimizer", "slimtrain",
            "--epochs", "3", "--batch-size", "20", "-o", str(tmp_path / "run"), *TINY]  # fmt: skip
    res = _json(runner.invoke(app, args))["results"]
    assert res["work_units"] == 7.0  # 3 epochs x 2 + the forward pass of the initial W(theta0)
    assert res["history"][-1]["test_rel_error"] < 1.0


def test_classify_antisym_multilevel_then_smoothness_and_attack(runner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train-ode", "--model", "odenet_antisym", "--data", "digits", "--optimizer", "gnvpro", "--iters", "2",
            "--levels", "2", "-o", str(out), *TINY]  # fmt: skip
    res = _json(runner.invoke(app, args))["results"]
    assert res["levels"][0]["depth"] == 4 and res["model_args"]["depth"] == 4
    assert res["final_metrics"]["test_accuracy"] > 0.5
    model = out / "model.safetensors"
    smooth = runner.invoke(app, ["smoothness-check", str(model), "--steps", "2,8", "--json", "-o", str(tmp_path / "s")])
    assert smooth.exit_code == 0, smooth.output
    attack = runner.invoke(app, ["attack", str(model), "-m", "fgsm", "--eps", "0.1", "--json", "-o", str(tmp_path / "a")])
    assert attack.exit_code == 0, attack.output


def test_bad_varpro_options_are_one_line_errors(runner, tmp_path: Path) -> None:
    res = runner.invoke(app, ["train-ode", "--task", "classify", "--optimizer", "slimtrain", "-o", str(tmp_path / "a"), *TINY])
    assert res.exit_code == 1 and "least squares" in res.output
    res = runner.invoke(app, ["train-ode", "--task", "regress", "--regularization", "x", "-o", str(tmp_path / "b"), *TINY])
    assert res.exit_code == 1 and "--regularization" in res.output
    res = runner.invoke(app, ["train-ode", "--task", "regress", "--compare", "newton", "-o", str(tmp_path / "c"), *TINY])
    assert res.exit_code == 1 and "gnvpro" in res.output


def test_train_ode_cdr_transient_gmres_subspace_and_lbfgs(runner, tmp_path: Path) -> None:
    args = ["train-ode", "--task", "regress", "--data", "cdr-transient", "--data-size", "40", "--data-dir", str(tmp_path / "cache"),
            "--optimizer", "gnvpro", "--tr-solver", "gmres-subspace", "--krylov-rank", "5", "--iters", "3", "--compare", "lbfgs",
            "-o", str(tmp_path / "run"), *TINY]  # fmt: skip
    res = _json(runner.invoke(app, args))["results"]
    assert res["data"] == "cdr-transient" and set(res["optimizers"]) == {"gnvpro", "lbfgs"}
    assert res["diagnosis"]["steps"] >= 1 and "Gauss-Newton diagnosis" in res["diagnosis"]["line"]
    gn = [h for h in res["history"] if "ratio" in h]
    assert gn and all(h["ratio"] == pytest.approx(h["actual_decrease"] / h["predicted_decrease"]) for h in gn)
    lb = res["optimizers"]["lbfgs"]
    assert lb["history"][-1]["train_loss"] < lb["history"][0]["train_loss"]
    assert lb["work_units"] == 1 + 2 * lb["history"][-1]["evaluations"]  # W(theta0)'s forward + 2 per evaluation
    res = runner.invoke(app, ["train-ode", "--task", "regress", "--tr-solver", "dogleg", "-o", str(tmp_path / "b"), *TINY])
    assert res.exit_code == 1 and "gmres-subspace" in res.output
