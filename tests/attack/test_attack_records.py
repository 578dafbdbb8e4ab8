"""Typed attack reports: ``to_dict()`` keeps report.json's keys, their order and values (the
order below is what the reports listed before the results were typed), and the seed spread and
CSV are read from attributes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from odekit.methods.attacks.evaluate import TransferMatrix
from odekit.methods.attacks.experiments import AttackRun, combine_seeds, curve_csv
from odekit.methods.attacks.records import (
    MatrixReport,
    PerSampleCurvePoint,
    PerSampleReport,
    Rate,
    UniversalCurvePoint,
    UniversalReport,
)
from odekit.stats import wilson_interval

POINT_KEYS = ["delta", "fooling_rate_fit", "fooling_rate_fit_ci95", "fooling_rate_test",
              "fooling_rate_test_ci95", "fooling_samples_test", "robust_accuracy",
              "robust_accuracy_ci95", "norm_pixel", "norm_model", "mean_effective_norm_pixel",
              "seconds", "total_seconds"]  # fmt: skip
UNIVERSAL_HEAD = ["method", "norm", "target_class", "clean_accuracy", "clean_accuracy_ci95",
                  "fit_samples", "test_samples", "iterations", "history_fit", "mode",
                  "budget_handling", "failures"]  # fmt: skip


def _universal(deltas: list[float], fooled: list[int], transfer: bool = False) -> UniversalReport:
    source = (0.25, 0.5) if transfer else (None, None)
    curve = [
        UniversalCurvePoint(d, Rate.counted(f, 40), Rate.counted(f, 80), Rate.counted(80 - f, 80),
                            d, 2 * d, d, 0.5, 1.5, *source)
        for d, f in zip(deltas, fooled, strict=True)
    ]  # fmt: skip
    return UniversalReport(method="uap", norm="2", target_class=None, clean=Rate.counted(72, 80),
                           fit_samples=40, test_samples=80, iterations=3, history_fit=[0.1],
                           mode="white-box", budget_handling="refitted per budget",
                           extra={"failures": 2}, curve=curve, fit_seconds=1.0)  # fmt: skip


def test_rate_counts_with_wilson_interval():
    rate = Rate.counted(3, 10)
    assert (rate.value, rate.n, rate.ci95) == (0.3, 10, wilson_interval(3, 10))
    assert Rate.counted(0, 0).ci95 == (0.0, 1.0) and Rate.counted(0, 0).value != Rate.counted(0, 0).value


def test_universal_report_keys_one_budget_and_sweep():
    one = _universal([2.0], [20]).to_dict()
    assert list(one) == [*UNIVERSAL_HEAD, *POINT_KEYS, "fit_seconds", "curve"]
    assert one["fooling_rate_test"] == 0.25 and one["fooling_rate_test_ci95"] == list(wilson_interval(20, 80))
    assert one["seconds"] == 1.5 and one["curve"][0]["seconds"] == 0.5  # total vs this budget's
    sweep = replace(_universal([1.0, 2.0], [8, 20], transfer=True), files={"figure_path": "a.png"},
                    budget_units="model", budget_given=[0.5, 1.0])  # fmt: skip
    d = sweep.to_dict()
    assert list(d)[-5:] == ["fit_seconds", "curve", "figure_path", "budget_units", "budget_given"]
    assert d["delta"] == [1.0, 2.0] and d["seconds"] == 2.0 and d["total_seconds"] == [1.5, 1.5]
    assert list(d["curve"][0])[-2:] == ["source_fooling_rate_fit", "source_fooling_rate_test"]


def test_per_sample_and_matrix_report_keys():
    curve = [PerSampleCurvePoint(e, Rate.counted(40 - k, 50), Rate.counted(k, 45), 0.2, 0.3, e, e / 2)
             for e, k in ((0.05, 5), (0.1, 20))]  # fmt: skip
    report = PerSampleReport(method="pgd", norm="inf", eps_units="pixels", backend="torch",
                             clean=Rate.counted(45, 50), curve=curve, fit_seconds=0.1,
                             budget_handling="rerun per budget", test_samples=50, mode="white-box")  # fmt: skip
    d = report.to_dict()
    assert list(d) == ["method", "norm", "eps", "eps_units", "backend", "clean_accuracy",
                       "clean_accuracy_ci95", "robust_accuracy", "fooling_rate_fit",
                       "fooling_rate_test", "seconds", "fit_seconds", "budget_handling",
                       "test_samples", "curve", "mode"]  # fmt: skip
    assert d["eps"] == [0.05, 0.1] and d["robust_accuracy"] == [0.7, 0.4]
    assert d["seconds"] == pytest.approx(0.5) and d["fooling_rate_fit"] is None
    table = TransferMatrix(["a", "b"], ["a", "b"], [[0.5, 0.1], [0.2, 0.6]], [[0.4, 0.8], [0.7, 0.3]])
    m = MatrixReport(method="fgsm", norm="inf", budget_key="eps", budget=0.1, table=table,
                     clean={"a": Rate.counted(9, 10), "b": Rate.counted(8, 10)},
                     seconds_per_source=[1.0, 2.0], test_samples=10).to_dict()  # fmt: skip
    assert list(m) == ["method", "norm", "eps", "matrix", "clean_accuracy", "clean_accuracy_ci95",
                       "seconds", "seconds_per_source", "test_samples"]  # fmt: skip
    assert m["clean_accuracy"] == {"a": 0.9, "b": 0.8} and m["seconds"] == 3.0
    assert m["matrix"]["orientation"].startswith("rows are sources")


def test_seed_spread_feeds_report_and_csv():
    runs = [AttackRun(_universal([1.0, 2.0], f)) for f in ([8, 20], [16, 30])]
    summary = combine_seeds(runs, [0, 1])
    spread = summary.across[1].fooling_rate_test
    assert (spread.mean, spread.min, spread.max, spread.runs) == (0.3125, 0.25, 0.375, 2)
    d = replace(runs[0].report, seeds=summary).to_dict()
    assert list(d["across_seeds"][0]) == ["delta", "fooling_rate_test", "robust_accuracy",
                                          "total_seconds", "fooling_rate_fit"]  # fmt: skip
    assert [r["seed"] for r in d["per_seed"]] == [0, 1] and d["seeds"] == [0, 1]
    rows = curve_csv(replace(runs[0].report, seeds=summary)).splitlines()
    assert rows[0].endswith("fooling_rate_test_std,seeds") and rows[2].startswith("2,0.25,")
    assert rows[2].split(",")[-3:] == ["0.3125", f"{spread.std:.6g}", "2"]
