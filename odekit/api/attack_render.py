"""What `odekit attack` shows: one table and a headline per kind of run (universal, per-sample,
transfer matrix), read from the typed report the experiment assembled."""

from __future__ import annotations

from typing import TYPE_CHECKING

from odekit.writers.tables import ReportTable

Rendered = tuple[list[ReportTable], list[str]]  # tables and headline

if TYPE_CHECKING:
    from odekit.methods.attacks.plan import AttackPlan
    from odekit.methods.attacks.records import (
        AttackReport,
        MatrixReport,
        PerSampleReport,
        Rate,
        Report,
        UniversalReport,
    )


def render(plan: AttackPlan, report: Report) -> Rendered:
    """Tables and headline for a finished run."""
    from odekit.methods.attacks.records import MatrixReport, UniversalReport

    if isinstance(report, MatrixReport):
        return _matrix(plan, report)
    if isinstance(report, UniversalReport):
        return _universal(plan, report)
    return _per_sample(plan, report)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _rate(rate: Rate) -> str:
    low, high = rate.ci95
    return f"{100 * rate.value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _seed_column(report: AttackReport, i: int) -> list[str]:
    if report.seeds is None:
        return []
    stats = report.seeds.across[i].fooling_rate_test
    return [f"{100 * stats.mean:.1f} ± {100 * stats.std:.1f}%"]


def _seed_header(report: AttackReport) -> list[str]:
    return [f"test fooling over {len(report.seeds.seeds)} seeds"] if report.seeds else []


def _seconds_header(fit_seconds: float) -> str:
    """A budget's own seconds exclude a fit shared by all budgets (shown in the headline)."""
    return "seconds (after the shared fit)" if fit_seconds else "seconds"


def _universal(plan: AttackPlan, report: UniversalReport) -> Rendered:
    curve = report.curve
    norm = plan.norm
    rows = [
        [_fmt(p.delta), _rate(p.fooling), _fmt(p.fit.value), _fmt(p.robust.value),
         _fmt(p.norm_pixel), _fmt(p.seconds), *_seed_column(report, i)]
        for i, p in enumerate(curve)
    ]  # fmt: skip
    headers = ["delta (px)", "test fooling [95% CI]", "fit fooling", "robust accuracy",
               f"||v||_{norm} (px)", _seconds_header(report.fit_seconds), *_seed_header(report)]  # fmt: skip
    target = report.target_class
    what = "test fooling rate" if target is None else f"targeted success (class {target})"
    headline = [
        f"{plan.method}: {what} "
        + ", ".join(f"{_rate(p.fooling)} @ ||v||_{norm} <= {p.delta:.4g}" for p in curve)
        + f" (pixels, n={curve[0].fooling.n}); {report.seconds:.2f} s"
        + (f", of which {report.fit_seconds:.2f} s shared fit" if report.fit_seconds else "")
    ]
    title = "Universal attack" + (" (sweep)" if len(curve) > 1 else "")
    return [ReportTable(title, headers, rows)], headline


def _per_sample(plan: AttackPlan, report: PerSampleReport) -> Rendered:
    curve = report.curve
    rows = [
        [_fmt(p.eps), _rate(p.robust), _rate(p.fooling), _fmt(p.mean_size), _fmt(p.seconds),
         *_seed_column(report, i)]
        for i, p in enumerate(curve)
    ]  # fmt: skip
    headers = ["eps", "robust accuracy [95% CI]", "fooling rate [95% CI]", "mean size",
               _seconds_header(report.fit_seconds), *_seed_header(report)]  # fmt: skip
    headline = [
        f"{plan.method}: clean accuracy {100 * report.clean.value:.1f}%, robust accuracy "
        + ", ".join(f"{100 * p.robust.value:.1f}% @ {p.eps:.4g}" for p in curve)
        + f" (n={report.test_samples})"
    ]
    return [ReportTable("Robust accuracy", headers, rows)], headline


def _matrix(plan: AttackPlan, report: MatrixReport) -> Rendered:
    table = report.table
    rows = [
        [f"{n} (source)", *[f"{100 * v:.1f}%" for v in row]]
        for n, row in zip(table.sources, table.fooling_rate, strict=True)
    ]
    headline = [
        f"{plan.method}: transfer fooling-rate matrix over {report.test_samples} test samples "
        "(rows: source, columns: target)"
    ]
    return [ReportTable("Fooling rate (source x target)", ["", *table.targets], rows)], headline
