"""What `odekit attack` prints: one table and a headline per kind of run (universal, per-sample,
transfer matrix), read from the results the experiment assembled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from odekit.cli.runner import CommandOutput, ResultTable

if TYPE_CHECKING:
    from odekit.methods.attacks.plan import AttackPlan


def render(plan: AttackPlan, results: dict[str, Any], matrix: bool) -> CommandOutput:
    """Tables and headline for a finished run (``results`` become the report's results)."""
    if matrix:
        return _matrix(plan, results)
    return _universal(plan, results) if plan.universal else _per_sample(plan, results)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _rate(point: dict[str, Any], key: str) -> str:
    low, high = point[f"{key}_ci95"]
    return f"{100 * point[key]:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _seed_column(results: dict[str, Any], i: int) -> list[str]:
    if "across_seeds" not in results:
        return []
    stats = results["across_seeds"][i]["fooling_rate_test"]
    return [f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}%"]


def _seed_header(results: dict[str, Any]) -> list[str]:
    n = len(results.get("seeds", []))
    return [f"test fooling over {n} seeds"] if n else []


def _universal(plan: AttackPlan, results: dict[str, Any]) -> CommandOutput:
    curve = results["curve"]
    norm = plan.norm
    rows = [
        [_fmt(p["delta"]), _rate(p, "fooling_rate_test"), _fmt(p["fooling_rate_fit"]),
         _fmt(p["robust_accuracy"]), _fmt(p["norm_pixel"]), _fmt(p["seconds"]),
         *_seed_column(results, i)]
        for i, p in enumerate(curve)
    ]  # fmt: skip
    headers = ["delta (px)", "test fooling [95% CI]", "fit fooling", "robust accuracy",
               f"||v||_{norm} (px)", "seconds", *_seed_header(results)]  # fmt: skip
    target = results["target_class"]
    what = "test fooling rate" if target is None else f"targeted success (class {target})"
    headline = [
        f"{plan.method}: {what} "
        + ", ".join(f"{_rate(p, 'fooling_rate_test')} @ ||v||_{norm} <= {p['delta']:.4g}" for p in curve)
        + f" (pixels, n={curve[0]['fooling_samples_test']}); {results['seconds']:.2f} s"
        + (f", of which {results['fit_seconds']:.2f} s shared fit" if results["fit_seconds"] else "")
    ]
    title = "Universal attack" + (" (sweep)" if len(curve) > 1 else "")
    return CommandOutput(results, [ResultTable(title, headers, rows)], headline)


def _per_sample(plan: AttackPlan, results: dict[str, Any]) -> CommandOutput:
    curve = results["curve"]
    rows = [
        [_fmt(p["eps"]), _rate(p, "robust_accuracy"), _rate(p, "fooling_rate"),
         _fmt(p["mean_size"]), _fmt(p["seconds"]), *_seed_column(results, i)]
        for i, p in enumerate(curve)
    ]  # fmt: skip
    headers = ["eps", "robust accuracy [95% CI]", "fooling rate [95% CI]", "mean size",
               "seconds", *_seed_header(results)]  # fmt: skip
    headline = [
        f"{plan.method}: clean accuracy {100 * results['clean_accuracy']:.1f}%, robust accuracy "
        + ", ".join(f"{100 * p['robust_accuracy']:.1f}% @ {p['eps']:.4g}" for p in curve)
        + f" (n={results['test_samples']})"
    ]
    return CommandOutput(results, [ResultTable("Robust accuracy", headers, rows)], headline)


def _matrix(plan: AttackPlan, results: dict[str, Any]) -> CommandOutput:
    table = results["matrix"]
    rows = [
        [f"{n} (source)", *[f"{100 * v:.1f}%" for v in row]]
        for n, row in zip(table["sources"], table["fooling_rate"], strict=True)
    ]
    headline = [
        f"{plan.method}: transfer fooling-rate matrix over {results['test_samples']} test samples "
        "(rows: source, columns: target)"
    ]
    return CommandOutput(
        results, [ResultTable("Fooling rate (source x target)", ["", *table["targets"]], rows)], headline
    )
