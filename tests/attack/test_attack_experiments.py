"""Whole experiments as a library call (what `odekit attack` runs): budgets, transfer, figures."""

from __future__ import annotations

import pytest
import torch

from odekit.io.datasets import load_dataset
from odekit.methods.attacks import (
    FGSMAttack,
    FGSMSettings,
    RandomAttack,
    UniversalSettings,
    lp_norm,
)
from odekit.methods.attacks.experiments import (
    Scoring,
    matrix_experiment,
    per_sample_experiment,
    universal_experiment,
)


@pytest.fixture(scope="module")
def digits():
    # Identity normalisation, so model units equal pixel units for the small MLP.
    return load_dataset("digits", input_shape=(1, 8, 8),
                        normalization={"mean": [0.0], "std": [1.0]})


def test_universal_experiment_reports_within_budget(small_mlp, digits):
    score = Scoring(seed=0, batch_size=128, device=torch.device("cpu"))
    run = universal_experiment(
        RandomAttack(UniversalSettings(norm="2", delta=2.0)), small_mlp, small_mlp, digits, digits,
        score, fit_samples=50, eval_samples=100, provenance={"model_sha256": "x"},
    )
    r = run.results
    assert r["norm_pixel"] <= 2.0 + 1e-5 and r["mean_effective_norm_pixel"] <= 2.0 + 1e-5
    assert r["norm_model"] == pytest.approx(r["norm_pixel"], rel=1e-6)
    assert (r["fit_samples"], r["test_samples"], r["mode"]) == (50, 100, "white-box")
    assert "source_fooling_rate_test" not in r
    assert lp_norm(run.tensors["perturbation_pixel"], "2") == pytest.approx(r["norm_pixel"])
    assert run.metadata["model_sha256"] == "x" and set(run.figures) == {"attack.png"}


def test_per_sample_experiment_curve_and_transfer_fields(small_mlp, digits):
    score = Scoring(seed=0, batch_size=128, device=torch.device("cpu"), transfer=True,
                    mode="black-box transfer")
    budgets = [0.05, 0.2]
    run = per_sample_experiment(
        FGSMAttack(FGSMSettings(norm="inf", backend="torch")), budgets, small_mlp, small_mlp,
        digits, score, eval_samples=100, provenance={},
    )
    r = run.results
    assert r["eps"] == budgets and len(r["curve"]) == 2
    assert r["robust_accuracy"][1] <= r["robust_accuracy"][0] < r["clean_accuracy"]
    # Same model on both sides: the "source" score equals the target score.
    assert [p["source_robust_accuracy"] for p in r["curve"]] == r["robust_accuracy"]
    for i, eps in enumerate(budgets):
        assert run.tensors[f"eps_{i}"].abs().amax() <= eps + 1e-6
    assert set(run.figures) == {"attack.png", "robust_accuracy.png"}


def test_matrix_experiment_diagonal_is_white_box(small_mlp, digits):
    score = Scoring(seed=0, batch_size=128, device=torch.device("cpu"))
    attack = FGSMAttack(FGSMSettings(norm="inf", backend="torch"))
    run = matrix_experiment(attack, 0.2, [("a", small_mlp), ("b", small_mlp)],
                            [("a", small_mlp), ("b", small_mlp)], digits, score,
                            fit_samples=20, eval_samples=100)
    white = per_sample_experiment(attack, [0.2], small_mlp, small_mlp, digits, score,
                                  eval_samples=100, provenance={})
    fool = run.results["matrix"]["fooling_rate"]
    assert fool[0][0] == fool[1][1] == white.results["fooling_rate_test"][0]
    assert run.results["eps"] == 0.2 and set(run.figures) == {"matrix.png"}
