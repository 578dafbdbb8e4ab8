"""Whole attack experiments: generate on one model, score on another, collect what a report
needs. `odekit attack` loads the models and data, calls one of these, and writes the result.

Every function works in [0, 1] pixel space: `attack_model` generates the attack (the source
model, possibly with its own ODE solver), `eval_model` is scored (the target). Equal models
give the white-box result.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from odekit.methods.attacks.records import (
    CurvePoint,
    MatrixReport,
    PerSampleCurvePoint,
    PerSampleReport,
    Rate,
    Report,
    SeedRun,
    SeedSpread,
    SeedSummary,
    UniversalCurvePoint,
    UniversalReport,
    one_or_all,
    scored_rates,
)
from odekit.methods.attacks.space import (
    apply_perturbation,
    check_differentiable,
    lp_norm,
    to_model_units,
    to_pixels,
)
from odekit.progress import Progress

if TYPE_CHECKING:
    from odekit.distributed import Distributed

N_EXAMPLES = 6


@dataclass
class AttackRun:
    """What an experiment produced: its typed report, tensors for the perturbation file with
    their metadata, and figures keyed by the file name they are meant for."""

    report: Report
    tensors: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)

    @property
    def results(self) -> dict[str, Any]:
        """The report's ``results`` entry (JSON-ready)."""
        return self.report.to_dict()


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
    curve: list[UniversalCurvePoint] = []
    tensors: dict[str, Tensor] = {}
    clean = Rate.counted(0, 0)
    for i, (eps, result) in enumerate(zip(budgets, fits, strict=True)):
        v = result.v
        fit = summed_over_ranks(attack_success(
            predict_on(eval_model, apply_perturbation(x_fit_dev, v), bs), clean_fit, target
        ), score.dist)  # fmt: skip
        clean, robust, fooling = scored_rates(
            evaluate_universal(eval_model, x_test, y_test, v, bs, target, score.dist))
        v_model = to_model_units(v, target_data)
        x_shard = score.shard(x_test)
        effective = dist.norms(apply_perturbation(x_shard, v) - x_shard)
        source_fit = source_test = None
        if score.transfer:
            source_fit = result.fooling_rate_fit
            source_test = evaluate_universal(
                attack_model, x_test, y_test, v, bs, target, score.dist
            )["fooling_rate"]
        curve.append(UniversalCurvePoint(
            eps, Rate.of(fit), fooling, robust, lp_norm(v, s.norm), lp_norm(v_model, s.norm),
            score.mean(effective), result.seconds, result.total_seconds, source_fit, source_test,
        ))  # fmt: skip
        if len(budgets) > 1:
            tensors[f"perturbation_{i}"], tensors[f"perturbation_pixel_{i}"] = v_model, v
    last, v = fits[-1], fits[-1].v
    tensors["perturbation"], tensors["perturbation_pixel"] = to_model_units(v, target_data), v
    report = UniversalReport(
        method=attack.name, norm=s.norm, target_class=target, clean=clean, fit_samples=len(x_fit),
        test_samples=len(x_test), iterations=last.iterations, history_fit=last.history,
        mode=score.mode,
        budget_handling="fitted once, scaled per budget" if not attack.reruns_per_budget
        else "refitted per budget",
        extra=dict(last.extra), curve=curve, fit_seconds=last.shared_seconds,
    )  # fmt: skip
    metadata = {
        "method": attack.name,
        "norm": s.norm,
        "delta": one_or_all([p.delta for p in curve]),
        "target_class": target,
        "units": "perturbation: model-input units; perturbation_pixel: [0,1] pixels"
        + ("; perturbation_<i>: budget i of delta" if len(budgets) > 1 else ""),
        "norm_pixel": one_or_all([p.norm_pixel for p in curve]),
        "norm_model": one_or_all([p.norm_model for p in curve]),
        **provenance,
        "data": target_data.describe(),
        "fooling_rate_test": one_or_all([p.fooling.value for p in curve]),
        "seed": score.seed,
    }
    k = min(N_EXAMPLES, len(x_test))
    x_ex = x_test[:k]
    x_adv = apply_perturbation(x_ex, v)
    before, after = predict_on(eval_model, x_ex).tolist(), predict_on(eval_model, x_adv).tolist()
    what = "targeted success" if target is not None else "test fooling rate"
    title = (
        f"{attack.name} ({dist.label}, delta={budgets[-1]:g} px): {what} "
        f"{100 * curve[-1].fooling.value:.1f}%"
    )
    figure = examples_figure(x_ex, x_adv, before, after, title, vector=v,
                             vector_title=f"v: ||v||_{s.norm} = {lp_norm(v, s.norm):.3g} px",
                             labels=y_test[:k].tolist())  # fmt: skip
    return AttackRun(report, tensors, metadata, {"attack.png": figure})


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
    curve: list[PerSampleCurvePoint] = []
    tensors: dict[str, Tensor] = {}
    clean = scored_rates(evaluate_adversarial(eval_model, x, y, x, bs, dist=score.dist))[0]
    # under torchrun each rank attacks its shard and the call gathers the whole x_adv
    runs = attack(attack_model, x, y, budgets, seed=score.seed, batch_size=bs,
                  progress=score.progress, dist=score.dist)  # fmt: skip
    for i, (eps, res) in enumerate(zip(budgets, runs, strict=True)):
        _, robust, fooling = scored_rates(
            evaluate_adversarial(eval_model, x, y, res.x_adv, bs, dist=score.dist))
        source_robust = None
        if score.transfer:
            source_robust = evaluate_adversarial(
                attack_model, x, y, res.x_adv, bs, dist=score.dist
            )["robust_accuracy"]
        curve.append(PerSampleCurvePoint(
            eps, robust, fooling, res.seconds, res.total_seconds, float(res.sizes.max()),
            float(res.sizes.mean()), source_robust,
        ))  # fmt: skip
        tensors[f"eps_{i}"] = res.x_adv - x
    last_adv = runs[-1].x_adv
    report = PerSampleReport(
        method=attack.name, norm=dist.key, eps_units=dist.unit,
        backend=getattr(attack.settings, "backend", "torch"), clean=clean, curve=curve,
        fit_seconds=runs[-1].shared_seconds,
        budget_handling="run once, clipped per budget" if not attack.reruns_per_budget
        else "rerun per budget",
        test_samples=len(x), mode=score.mode,
    )  # fmt: skip
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
             f"{100 * curve[-1].robust.value:.1f}%")
    xlabel = f"eps ({dist.label}, {dist.unit})"
    figures = {
        "attack.png": examples_figure(x[:k], last_adv[:k], before, after, title,
                                      labels=y[:k].tolist(), rows=("clean", "adversarial")),
        "robust_accuracy.png": curve_figure(budgets, [p.robust.value for p in curve], clean.value,
                                            f"{attack.name}: robust accuracy", xlabel),
    }
    return AttackRun(report, tensors, metadata, figures)


def _curve_report(report: Report) -> UniversalReport | PerSampleReport:
    if isinstance(report, MatrixReport):
        raise TypeError("a transfer matrix has no per-budget curve")
    return report


def combine_seeds(runs: list[AttackRun], seeds: list[int]) -> SeedSummary:
    """Mean and spread over runs that differ only in their seed: per budget (the points of each
    curve) for the test (and fit) fooling rate, robust accuracy and seconds; and each seed's own
    curve."""
    reports = [_curve_report(run.report) for run in runs]
    across = [SeedSpread.over([r.curve[i] for r in reports]) for i in range(len(reports[0].curve))]
    per_seed = [SeedRun(seed, r.curve, r.seconds) for seed, r in zip(seeds, reports, strict=True)]
    return SeedSummary(seeds, across, per_seed)


def curve_csv(report: Report) -> str:
    """The per-budget rows of a report as CSV (one line per budget; over seeds, their mean and
    standard deviation too)."""
    curve: Sequence[CurvePoint] = _curve_report(report).curve
    first = curve[0]
    header = [first.budget_key, first.rate_key, "ci95_low", "ci95_high", "robust_accuracy",
              "seconds", "total_seconds"]  # fmt: skip
    across = report.seeds.across if report.seeds else None
    if across:
        header += ["fooling_rate_test_mean", "fooling_rate_test_std", "seeds"]
    lines = [",".join(header)]
    for i, p in enumerate(curve):
        row = [p.budget, p.fooling.value, *p.fooling.ci95, p.robust.value, p.seconds,
               p.total_seconds]  # fmt: skip
        if across:
            stats = across[i].fooling_rate_test
            row += [stats.mean, stats.std, stats.runs]
        lines.append(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    return "\n".join(lines) + "\n"


def sweep_plot(report: Report, distance: Distance) -> Figure:
    """Fooling rate against the budget (the curve; error bars over seeds if present)."""
    curve: Sequence[CurvePoint] = _curve_report(report).curve
    first = curve[0]
    across = report.seeds.across if report.seeds else None
    return sweep_figure(
        [p.budget for p in curve],
        [p.fooling.value for p in curve],
        [p.fooling.ci95[0] for p in curve],
        [p.fooling.ci95[1] for p in curve],
        f"{report.method}: fooling rate vs budget",
        f"{first.budget_key} ({distance.label}, {distance.unit})",
        fit_rates=[p.fit.value for p in curve if isinstance(p, UniversalCurvePoint)] or None,
        spread=[r.fooling_rate_test.std for r in across] if across else None,
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
    clean = {name: scored_rates(evaluate_adversarial(model, x, y, x, bs))[0]
             for name, model in targets}  # fmt: skip
    budget_key = "delta" if isinstance(attack, UniversalAttack) else "eps"
    norm = attack.distance.key
    report = MatrixReport(method=attack.name, norm=norm, budget_key=budget_key, budget=budget,
                          table=table, clean=clean, seconds_per_source=seconds,
                          test_samples=len(x))  # fmt: skip
    title = (f"{attack.name} ({norm}, {budget_key}={budget:.4g}): fooling rate, "
             "source x target")
    return AttackRun(report, figures={
        "matrix.png": matrix_figure([n for n, _ in sources], table.fooling_rate, title),
    })
