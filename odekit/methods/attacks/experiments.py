"""Whole attack experiments: generate on one model, score on another, collect what a report
needs. `odekit attack` loads the models and data, calls one of these, and writes the result.

Every function works in [0, 1] pixel space: `attack_model` generates the attack (the source
model, possibly with its own ODE solver), `eval_model` is scored (the target). Equal models
give the white-box result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from odekit.io.datasets import Dataset
from odekit.methods.attacks.base import (
    PerSampleAttack,
    UniversalAttack,
    attack_success,
    predict_on,
    summed_over_ranks,
)
from odekit.methods.attacks.distance import Distance
from odekit.methods.attacks.evaluate import (
    evaluate_adversarial,
    evaluate_universal,
    transfer_matrix,
)
from odekit.methods.attacks.figures import (
    curve_figure,
    examples_figure,
    matrix_figure,
    sweep_figure,
)
from odekit.methods.attacks.space import (
    apply_perturbation,
    check_differentiable,
    lp_norm,
    to_model_units,
    to_pixels,
)
from odekit.progress import Progress
from odekit.stats import spread, wilson_interval

if TYPE_CHECKING:
    from odekit.distributed import Distributed

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
    # a torchrun launch (issue 15): the fit and the scoring shard their sets over its ranks
    dist: Distributed | None = None

    def shard(self, t: Tensor) -> Tensor:
        """This rank's contiguous share of ``t`` (all of it in a single process)."""
        if self.dist is None or self.dist.world_size == 1:
            return t
        rows = self.dist.shard(len(t))
        return t[rows.start : rows.stop]

    def mean(self, values: Tensor) -> float:
        """Mean of ``values`` sharded by `shard`, over every rank."""
        if self.dist is None or self.dist.world_size == 1:
            return float(values.mean())
        return self.dist.mean(float(values.double().sum()), len(values))


def eval_inputs(data: Dataset, samples: int | None, seed: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-space test inputs and labels (a seeded subset when `samples` is given)."""
    test = data.test.subset(samples, seed=seed)
    return to_pixels(test.x, data, "the test data").to(device), test.y.to(device)


def fit_inputs(data: Dataset, samples: int, seed: int) -> Tensor:
    """Pixel-space training inputs a universal vector is fitted on (kept on the CPU)."""
    return to_pixels(data.train.subset(samples, seed=seed).x, data, "the fitting data")


def _ci(successes: int, n: int) -> list[float]:
    return list(wilson_interval(successes, n))


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
    budgets: list[float] | None = None,
) -> AttackRun:
    """Fit a universal vector on `fit_data` with `attack_model`, score it on `eval_model`, at
    each budget (default: the settings' delta). A sweep fits budget-free directions once."""
    s = attack.settings
    dist = attack.distance
    budgets = [float(s.delta)] if budgets is None else list(budgets)
    target = attack.target
    x_fit = fit_inputs(fit_data, fit_samples, score.seed)
    x_test, y_test = eval_inputs(target_data, eval_samples, score.seed, score.device)
    check_differentiable(attack_model, x_fit[:2].to(score.device))
    fits = attack(attack_model, x_fit, None, budgets, seed=score.seed,
                  batch_size=score.batch_size, progress=score.progress, dist=score.dist)  # fmt: skip
    bs = score.batch_size
    x_fit_dev = score.shard(x_fit).to(score.device)
    clean_fit = predict_on(eval_model, x_fit_dev, bs)
    curve: list[dict[str, Any]] = []
    tensors: dict[str, Tensor] = {}
    test_eval: dict[str, float] = {}
    for i, (eps, result) in enumerate(zip(budgets, fits, strict=True)):
        v = result.v
        fit = summed_over_ranks(attack_success(
            predict_on(eval_model, apply_perturbation(x_fit_dev, v), bs), clean_fit, target
        ), score.dist)  # fmt: skip
        test_eval = evaluate_universal(eval_model, x_test, y_test, v, bs, target, score.dist)
        v_model = to_model_units(v, target_data)
        x_shard = score.shard(x_test)
        effective = dist.norms(apply_perturbation(x_shard, v) - x_shard)
        point: dict[str, Any] = {
            "delta": eps,
            "fooling_rate_fit": fit.rate,
            "fooling_rate_fit_ci95": list(fit.ci95),
            "fooling_rate_test": test_eval["fooling_rate"],
            "fooling_rate_test_ci95": _ci(int(test_eval["fooled"]), int(test_eval["fooling_n"])),
            "fooling_samples_test": int(test_eval["fooling_n"]),
            "robust_accuracy": test_eval["robust_accuracy"],
            "robust_accuracy_ci95": _ci(int(test_eval["robust_correct"]), int(test_eval["n"])),
            "norm_pixel": lp_norm(v, s.norm),
            "norm_model": lp_norm(v_model, s.norm),
            "mean_effective_norm_pixel": score.mean(effective),
            "seconds": result.seconds,
            "total_seconds": result.total_seconds,
        }
        if score.transfer:
            point["source_fooling_rate_fit"] = result.fooling_rate_fit
            point["source_fooling_rate_test"] = evaluate_universal(
                attack_model, x_test, y_test, v, bs, target, score.dist
            )["fooling_rate"]
        curve.append(point)
        if len(budgets) > 1:
            tensors[f"perturbation_{i}"], tensors[f"perturbation_pixel_{i}"] = v_model, v
    last, v = fits[-1], fits[-1].v
    tensors["perturbation"], tensors["perturbation_pixel"] = to_model_units(v, target_data), v
    fit_seconds = last.shared_seconds
    results: dict[str, Any] = {
        "method": attack.name,
        "norm": s.norm,
        "target_class": target,
        "clean_accuracy": test_eval["clean_accuracy"],
        "clean_accuracy_ci95": _ci(int(test_eval["clean_correct"]), int(test_eval["n"])),
        "fit_samples": len(x_fit),
        "test_samples": len(x_test),
        "iterations": last.iterations,
        "history_fit": last.history,
        "mode": score.mode,
        "budget_handling": "fitted once, scaled per budget" if not attack.reruns_per_budget
        else "refitted per budget",
        **last.extra,
    }
    # one budget: scalars as always; a sweep: one list entry per budget (and the curve rows)
    for key in curve[0]:
        values = [p[key] for p in curve]
        results[key] = values[0] if len(curve) == 1 else values
    results["seconds"] = fit_seconds + sum(p["seconds"] for p in curve)
    results["fit_seconds"] = fit_seconds
    results["curve"] = curve
    metadata = {
        "method": attack.name,
        "norm": s.norm,
        "delta": results["delta"],
        "target_class": target,
        "units": "perturbation: model-input units; perturbation_pixel: [0,1] pixels"
        + ("; perturbation_<i>: budget i of delta" if len(budgets) > 1 else ""),
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
    what = "targeted success" if target is not None else "test fooling rate"
    title = (
        f"{attack.name} ({dist.label}, delta={budgets[-1]:g} px): {what} "
        f"{100 * curve[-1]['fooling_rate_test']:.1f}%"
    )
    figure = examples_figure(x_ex, x_adv, before, after, title, vector=v,
                             vector_title=f"v: ||v||_{s.norm} = {lp_norm(v, s.norm):.3g} px",
                             labels=y_test[:k].tolist())  # fmt: skip
    return AttackRun(results, tensors, metadata, {"attack.png": figure})


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
    """Attack held-out samples at every budget (minimization attacks run once and are clipped
    per budget); the robust-accuracy curve and examples."""
    x, y = eval_inputs(target_data, eval_samples, score.seed, score.device)
    check_differentiable(attack_model, x[:2])
    bs = score.batch_size
    dist = attack.distance
    curve: list[dict[str, Any]] = []
    tensors: dict[str, Tensor] = {}
    clean_eval = evaluate_adversarial(eval_model, x, y, x, bs, dist=score.dist)
    # under torchrun each rank attacks its shard and the call gathers the whole x_adv
    runs = attack(attack_model, x, y, budgets, seed=score.seed, batch_size=bs,
                  progress=score.progress, dist=score.dist)  # fmt: skip
    for i, (eps, res) in enumerate(zip(budgets, runs, strict=True)):
        scores = evaluate_adversarial(eval_model, x, y, res.x_adv, bs, dist=score.dist)
        point: dict[str, Any] = {
            "eps": eps,
            "robust_accuracy": scores["robust_accuracy"],
            "robust_accuracy_ci95": _ci(int(scores["robust_correct"]), int(scores["n"])),
            "fooling_rate": scores["fooling_rate"],
            "fooling_rate_ci95": _ci(int(scores["fooled"]), int(scores["fooling_n"])),
            "seconds": res.seconds,
            "total_seconds": res.total_seconds,
            "max_size": float(res.sizes.max()),
            "mean_size": float(res.sizes.mean()),
        }
        if score.transfer:
            point["source_robust_accuracy"] = evaluate_adversarial(
                attack_model, x, y, res.x_adv, bs, dist=score.dist
            )["robust_accuracy"]
        curve.append(point)
        tensors[f"eps_{i}"] = res.x_adv - x
    last_adv = runs[-1].x_adv
    shared = runs[-1].shared_seconds
    results: dict[str, Any] = {
        "method": attack.name,
        "norm": dist.key,
        "eps": budgets,
        "eps_units": dist.unit,
        "backend": getattr(attack.settings, "backend", "torch"),
        "clean_accuracy": clean_eval["clean_accuracy"],
        "clean_accuracy_ci95": _ci(int(clean_eval["clean_correct"]), int(clean_eval["n"])),
        "robust_accuracy": [p["robust_accuracy"] for p in curve],
        "fooling_rate_fit": None,
        "fooling_rate_test": [p["fooling_rate"] for p in curve],
        "seconds": shared + sum(p["seconds"] for p in curve),
        "fit_seconds": shared,
        "budget_handling": "run once, clipped per budget" if not attack.reruns_per_budget
        else "rerun per budget",
        "test_samples": len(x),
        "curve": curve,
        "mode": score.mode,
    }
    metadata = {
        "method": attack.name,
        "norm": dist.key,
        "eps": budgets,
        "units": f"pixel-space x_adv - x; eps in {dist.unit}",
        **provenance,
        "data": target_data.describe(),
        "test_indices_seed": score.seed,
    }
    k = min(N_EXAMPLES, len(x))
    before = predict_on(eval_model, x[:k]).tolist()
    after = predict_on(eval_model, last_adv[:k]).tolist()
    title = (f"{attack.name} ({dist.key}, eps={budgets[-1]:.4g}): robust accuracy "
             f"{100 * curve[-1]['robust_accuracy']:.1f}%")
    xlabel = f"eps ({dist.label}, {dist.unit})"
    figures = {
        "attack.png": examples_figure(x[:k], last_adv[:k], before, after, title,
                                      labels=y[:k].tolist(), rows=("clean", "adversarial")),
        "robust_accuracy.png": curve_figure(budgets, results["robust_accuracy"],
                                            clean_eval["clean_accuracy"],
                                            f"{attack.name}: robust accuracy", xlabel),
    }
    return AttackRun(results, tensors, metadata, figures)


def combine_seeds(runs: list[AttackRun], seeds: list[int]) -> dict[str, Any]:
    """Mean and spread over runs that differ only in their seed: per budget (the rows of
    ``curve``) for the test (and fit) fooling rate, robust accuracy and seconds; and each
    seed's own curve."""
    curve0 = runs[0].results["curve"]
    universal = "delta" in curve0[0]
    budget_key = "delta" if universal else "eps"
    keys = {
        "fooling_rate_test": "fooling_rate_test" if universal else "fooling_rate",
        "robust_accuracy": "robust_accuracy",
        "total_seconds": "total_seconds",
    }
    if universal:
        keys["fooling_rate_fit"] = "fooling_rate_fit"
    across = [
        {budget_key: point[budget_key],
         **{name: spread([r.results["curve"][i][src] for r in runs]) for name, src in keys.items()}}
        for i, point in enumerate(curve0)
    ]  # fmt: skip
    per_seed = [
        {"seed": seed, "curve": r.results["curve"], "seconds": r.results["seconds"]}
        for seed, r in zip(seeds, runs, strict=True)
    ]
    return {"seeds": seeds, "across_seeds": across, "per_seed": per_seed}


def curve_csv(results: dict[str, Any]) -> str:
    """The per-budget rows of a report as CSV (one line per budget; over seeds, their mean and
    standard deviation too)."""
    curve = results["curve"]
    budget_key = "delta" if "delta" in curve[0] else "eps"
    rate_key = "fooling_rate_test" if budget_key == "delta" else "fooling_rate"
    ci_key = f"{rate_key}_ci95"
    header = [budget_key, rate_key, "ci95_low", "ci95_high", "robust_accuracy", "seconds",
              "total_seconds"]  # fmt: skip
    across = results.get("across_seeds")
    if across:
        header += ["fooling_rate_test_mean", "fooling_rate_test_std", "seeds"]
    lines = [",".join(header)]
    for i, p in enumerate(curve):
        row = [p[budget_key], p[rate_key], *p[ci_key], p["robust_accuracy"], p["seconds"],
               p["total_seconds"]]  # fmt: skip
        if across:
            stats = across[i]["fooling_rate_test"]
            row += [stats["mean"], stats["std"], stats["runs"]]
        lines.append(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    return "\n".join(lines) + "\n"


def sweep_plot(results: dict[str, Any], distance: Distance) -> Figure:
    """Fooling rate against the budget (``curve`` rows; error bars over seeds if present)."""
    curve = results["curve"]
    budget_key = "delta" if "delta" in curve[0] else "eps"
    rate_key = "fooling_rate_test" if budget_key == "delta" else "fooling_rate"
    across = results.get("across_seeds")
    return sweep_figure(
        [p[budget_key] for p in curve],
        [p[rate_key] for p in curve],
        [p[f"{rate_key}_ci95"][0] for p in curve],
        [p[f"{rate_key}_ci95"][1] for p in curve],
        f"{results['method']}: fooling rate vs budget",
        f"{budget_key} ({distance.label}, {distance.unit})",
        fit_rates=[p["fooling_rate_fit"] for p in curve] if budget_key == "delta" else None,
        spread=[r["fooling_rate_test"]["std"] for r in across] if across else None,
    )


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
            res = attack(source, x_fit, None, budget, seed=score.seed, batch_size=bs,
                         progress=score.progress)  # fmt: skip
            seconds.append(res.total_seconds)
            return apply_perturbation(x, res.v)
        res_ps = attack(source, x, y, budget, seed=score.seed, batch_size=bs,
                        progress=score.progress)
        seconds.append(res_ps.total_seconds)
        return res_ps.x_adv

    table = transfer_matrix(sources, targets, generate, x, y, bs)
    names = [name for name, _ in targets]
    clean_evals = [evaluate_adversarial(model, x, y, x, bs) for _, model in targets]
    clean = [e["clean_accuracy"] for e in clean_evals]
    universal = isinstance(attack, UniversalAttack)
    budget_key = "delta" if universal else "eps"
    norm = attack.distance.key
    results: dict[str, Any] = {
        "method": attack.name,
        "norm": norm,
        budget_key: budget,
        "matrix": {
            **table.to_dict(),
            "orientation": "rows are sources (generated on), columns are targets (evaluated on)",
        },
        "clean_accuracy": dict(zip(names, clean, strict=True)),
        "clean_accuracy_ci95": {
            n: _ci(int(e["clean_correct"]), int(e["n"])) for n, e in zip(names, clean_evals, strict=True)
        },
        "seconds": sum(seconds),
        "seconds_per_source": seconds,
        "test_samples": len(x),
    }
    title = (f"{attack.name} ({norm}, {budget_key}={budget:.4g}): fooling rate, "
             "source x target")
    return AttackRun(results, figures={
        "matrix.png": matrix_figure([n for n, _ in sources], table.fooling_rate, title),
    })
