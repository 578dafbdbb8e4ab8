"""Whole attack experiments: generate on one model, score on another, collect what a report
needs. `odekit attack` loads the models and data, calls one of these, and writes the result.

Every function works in [0, 1] pixel space: `attack_model` generates the attack (the source
model, possibly with its own ODE solver), `eval_model` is scored (the target). Equal models
give the white-box result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from odekit.io.datasets import Dataset
from odekit.methods.attacks.base import (
    PerSampleAttack,
    UniversalAttack,
    fooling_rate,
    predict_on,
)
from odekit.methods.attacks.evaluate import (
    evaluate_adversarial,
    evaluate_universal,
    transfer_matrix,
)
from odekit.methods.attacks.figures import curve_figure, examples_figure, matrix_figure
from odekit.methods.attacks.space import (
    apply_perturbation,
    check_differentiable,
    lp_norm,
    to_model_units,
    to_pixels,
)
from odekit.progress import Progress

N_EXAMPLES = 6


@dataclass
class AttackRun:
    """What an experiment produced: report entries, tensors for the perturbation file with
    their metadata, and figures keyed by the file name they are meant for."""

    results: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)


@dataclass(frozen=True)
class Scoring:
    """Shared settings of one experiment."""

    seed: int
    batch_size: int
    device: torch.device
    progress: Progress | None = None
    transfer: bool = False  # source model or solver differs from the target's
    mode: str = "white-box"


def eval_inputs(data: Dataset, samples: int | None, seed: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-space test inputs and labels (a seeded subset when `samples` is given)."""
    test = data.test.subset(samples, seed=seed)
    return to_pixels(test.x, data, "the test data").to(device), test.y.to(device)


def fit_inputs(data: Dataset, samples: int, seed: int) -> Tensor:
    """Pixel-space training inputs a universal vector is fitted on (kept on the CPU)."""
    return to_pixels(data.train.subset(samples, seed=seed).x, data, "the fitting data")


def universal_experiment(
    attack: UniversalAttack,
    attack_model: nn.Module,
    eval_model: nn.Module,
    fit_data: Dataset,
    target_data: Dataset,
    score: Scoring,
    *,
    fit_samples: int,
    eval_samples: int | None,
    provenance: dict[str, Any],
) -> AttackRun:
    """Fit a universal vector on `fit_data` with `attack_model`, score it on `eval_model`."""
    s = attack.settings
    x_fit = fit_inputs(fit_data, fit_samples, score.seed)
    x_test, y_test = eval_inputs(target_data, eval_samples, score.seed, score.device)
    check_differentiable(attack_model, x_fit[:2].to(score.device))
    result = attack(attack_model, x_fit, seed=score.seed, batch_size=score.batch_size,
                    progress=score.progress)
    v, bs = result.v, score.batch_size
    x_fit_dev = x_fit.to(score.device)
    fit_rate = fooling_rate(eval_model, x_fit_dev, v, predict_on(eval_model, x_fit_dev, bs), bs)
    test_eval = evaluate_universal(eval_model, x_test, y_test, v, bs)
    v_model = to_model_units(v, target_data)
    effective = (apply_perturbation(x_test, v) - x_test).flatten(1)
    eff_norm = effective.norm(dim=1) if s.norm == "2" else effective.abs().amax(dim=1)
    results: dict[str, Any] = {
        "method": attack.name,
        "norm": s.norm,
        "delta": s.delta,
        "clean_accuracy": test_eval["clean_accuracy"],
        "robust_accuracy": test_eval["robust_accuracy"],
        "fooling_rate_fit": fit_rate,
        "fooling_rate_test": test_eval["fooling_rate"],
        "seconds": result.seconds,
        "norm_pixel": lp_norm(v, s.norm),
        "norm_model": lp_norm(v_model, s.norm),
        "mean_effective_norm_pixel": float(eff_norm.mean()),
        "fit_samples": len(x_fit),
        "test_samples": len(x_test),
        "iterations": result.iterations,
        "history_fit": result.history,
        "mode": score.mode,
        **result.extra,
    }
    if score.transfer:
        results["source_fooling_rate_fit"] = result.fooling_rate_fit
        results["source_fooling_rate_test"] = evaluate_universal(
            attack_model, x_test, y_test, v, bs
        )["fooling_rate"]
    metadata = {
        "method": attack.name,
        "norm": s.norm,
        "delta": s.delta,
        "units": "perturbation: model-input units; perturbation_pixel: [0,1] pixels",
        "norm_pixel": results["norm_pixel"],
        "norm_model": results["norm_model"],
        **provenance,
        "data": target_data.describe(),
        "fooling_rate_test": results["fooling_rate_test"],
        "seed": score.seed,
    }
    k = min(N_EXAMPLES, len(x_test))
    x_ex = x_test[:k]
    x_adv = apply_perturbation(x_ex, v)
    before, after = predict_on(eval_model, x_ex).tolist(), predict_on(eval_model, x_adv).tolist()
    title = (
        f"{attack.name} (l{s.norm}, delta={s.delta:g} px): test fooling rate "
        f"{100 * results['fooling_rate_test']:.1f}%"
    )
    figure = examples_figure(x_ex, x_adv, before, after, title, vector=v,
                             vector_title="v (pixels)")
    return AttackRun(results, {"perturbation": v_model, "perturbation_pixel": v}, metadata,
                     {"attack.png": figure})


def per_sample_experiment(
    attack: PerSampleAttack,
    budgets: list[float],
    attack_model: nn.Module,
    eval_model: nn.Module,
    target_data: Dataset,
    score: Scoring,
    *,
    eval_samples: int | None,
    provenance: dict[str, Any],
) -> AttackRun:
    """Attack held-out samples at every budget; the robust-accuracy curve and examples."""
    x, y = eval_inputs(target_data, eval_samples, score.seed, score.device)
    check_differentiable(attack_model, x[:2])
    bs = score.batch_size
    curve, tensors = [], {}
    seconds = 0.0
    clean_acc = evaluate_adversarial(eval_model, x, y, x, bs)["clean_accuracy"]
    last_adv = x
    for i, eps in enumerate(budgets):
        res = attack(attack_model, x, y, eps, seed=score.seed + i, batch_size=bs,
                     progress=score.progress)
        seconds += res.seconds
        scores = evaluate_adversarial(eval_model, x, y, res.x_adv, bs)
        point = {
            "eps": eps,
            "robust_accuracy": scores["robust_accuracy"],
            "fooling_rate": scores["fooling_rate"],
            "seconds": res.seconds,
            "max_size": float(res.sizes.max()),
            "mean_size": float(res.sizes.mean()),
        }
        if score.transfer:
            point["source_robust_accuracy"] = evaluate_adversarial(
                attack_model, x, y, res.x_adv, bs
            )["robust_accuracy"]
        curve.append(point)
        tensors[f"eps_{i}"] = res.x_adv - x
        last_adv = res.x_adv
    deform = attack.name == "adef"
    unit = "pixels of displacement (T-norm)" if deform else "[0,1] pixel units"
    results: dict[str, Any] = {
        "method": attack.name,
        "norm": attack.norm_label,
        "eps": budgets,
        "eps_units": unit,
        "backend": getattr(attack.settings, "backend", "torch"),
        "clean_accuracy": clean_acc,
        "robust_accuracy": [p["robust_accuracy"] for p in curve],
        "fooling_rate_fit": None,
        "fooling_rate_test": [p["fooling_rate"] for p in curve],
        "seconds": seconds,
        "test_samples": len(x),
        "curve": curve,
        "mode": score.mode,
    }
    metadata = {
        "method": attack.name,
        "norm": attack.norm_label,
        "eps": budgets,
        "units": f"pixel-space x_adv - x; eps in {unit}",
        **provenance,
        "data": target_data.describe(),
        "test_indices_seed": score.seed,
    }
    k = min(N_EXAMPLES, len(x))
    before = predict_on(eval_model, x[:k]).tolist()
    after = predict_on(eval_model, last_adv[:k]).tolist()
    title = (f"{attack.name} ({attack.norm_label}, eps={budgets[-1]:.4g}): robust accuracy "
             f"{100 * curve[-1]['robust_accuracy']:.1f}%")
    xlabel = "eps (T-norm, pixels)" if deform else f"eps (l{attack.norm_label}, [0,1] pixel units)"
    figures = {
        "attack.png": examples_figure(x[:k], last_adv[:k], before, after, title),
        "robust_accuracy.png": curve_figure(budgets, results["robust_accuracy"], clean_acc,
                                            f"{attack.name}: robust accuracy", xlabel),
    }
    return AttackRun(results, tensors, metadata, figures)


def matrix_experiment(
    attack: UniversalAttack | PerSampleAttack,
    budget: float,
    sources: list[tuple[str, nn.Module]],
    targets: list[tuple[str, nn.Module]],
    data: Dataset,
    score: Scoring,
    *,
    fit_samples: int,
    eval_samples: int | None,
) -> AttackRun:
    """Generate on every source, score on every target (rows: sources, columns: targets)."""
    x, y = eval_inputs(data, eval_samples, score.seed, score.device)
    x_fit = fit_inputs(data, fit_samples, score.seed)
    for _, model in sources:
        check_differentiable(model, x[:2])
    seconds: list[float] = []
    bs = score.batch_size

    def generate(source: nn.Module) -> Tensor:
        if isinstance(attack, UniversalAttack):
            res = attack(source, x_fit, seed=score.seed, batch_size=bs, progress=score.progress)
            seconds.append(res.seconds)
            return apply_perturbation(x, res.v)
        res_ps = attack(source, x, y, budget, seed=score.seed, batch_size=bs,
                        progress=score.progress)
        seconds.append(res_ps.seconds)
        return res_ps.x_adv

    table = transfer_matrix(sources, targets, generate, x, y, bs)
    names = [name for name, _ in targets]
    clean = [evaluate_adversarial(model, x, y, x, bs)["clean_accuracy"] for _, model in targets]
    universal = isinstance(attack, UniversalAttack)
    budget_key = "delta" if universal else "eps"
    norm = attack.norm_label if isinstance(attack, PerSampleAttack) else attack.settings.norm
    results: dict[str, Any] = {
        "method": attack.name,
        "norm": norm,
        budget_key: budget,
        "matrix": {
            **table.to_dict(),
            "orientation": "rows are sources (generated on), columns are targets (evaluated on)",
        },
        "clean_accuracy": dict(zip(names, clean, strict=True)),
        "seconds": sum(seconds),
        "seconds_per_source": seconds,
        "test_samples": len(x),
    }
    title = (f"{attack.name} ({norm}, {budget_key}={budget:.4g}): fooling rate, "
             "source x target")
    return AttackRun(results, figures={
        "matrix.png": matrix_figure([n for n, _ in sources], table.fooling_rate, title),
    })
