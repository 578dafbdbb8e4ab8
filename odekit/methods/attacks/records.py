"""Typed results of whole attack experiments (`odekit.methods.attacks.experiments`): one point
per budget, the run's report (universal, per-sample or transfer matrix), the spread over seeds.
The CLI reads their attributes; ``to_dict()`` gives the report's ``results`` entry, key by key
in the order the reports have always listed them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from odekit.methods.attacks.evaluate import TransferMatrix
from odekit.stats import Proportion, spread, wilson_interval

MATRIX_ORIENTATION = "rows are sources (generated on), columns are targets (evaluated on)"


@dataclass(frozen=True)
class Rate:
    """A proportion measured on ``n`` samples with its Wilson 95% interval."""

    value: float
    n: int
    ci95: tuple[float, float]

    @classmethod
    def counted(cls, successes: int, n: int) -> Rate:
        """``successes`` of ``n`` (NaN when nothing was measured)."""
        return cls(successes / n if n else float("nan"), n, wilson_interval(successes, n))

    @classmethod
    def of(cls, share: Proportion) -> Rate:
        return cls(share.rate, share.n, share.ci95)


def scored_rates(scores: Mapping[str, float]) -> tuple[Rate, Rate, Rate]:
    """Clean accuracy, robust accuracy and fooling rate of an `evaluate_adversarial` result."""
    n = int(scores["n"])
    return (Rate.counted(int(scores["clean_correct"]), n),
            Rate.counted(int(scores["robust_correct"]), n),
            Rate.counted(int(scores["fooled"]), int(scores["fooling_n"])))  # fmt: skip


def _rate_entries(key: str, rate: Rate) -> dict[str, Any]:
    return {key: rate.value, f"{key}_ci95": list(rate.ci95)}


@dataclass(frozen=True)
class UniversalCurvePoint:
    """A universal vector scored at one budget ``delta`` (pixels): fooling on the fitting set
    (``fit``) and on the test set (``fooling``), robust accuracy, its norms and times. In a
    transfer run, ``source_fit`` and ``source_test`` are the generating model's own rates."""

    delta: float
    fit: Rate
    fooling: Rate
    robust: Rate
    norm_pixel: float
    norm_model: float
    mean_effective_norm_pixel: float
    seconds: float
    total_seconds: float
    source_fit: float | None = None
    source_test: float | None = None

    budget_key: ClassVar[str] = "delta"
    rate_key: ClassVar[str] = "fooling_rate_test"

    @property
    def budget(self) -> float:
        return self.delta

    def to_dict(self) -> dict[str, Any]:
        point = {
            "delta": self.delta,
            **_rate_entries("fooling_rate_fit", self.fit),
            **_rate_entries("fooling_rate_test", self.fooling),
            "fooling_samples_test": self.fooling.n,
            **_rate_entries("robust_accuracy", self.robust),
            "norm_pixel": self.norm_pixel,
            "norm_model": self.norm_model,
            "mean_effective_norm_pixel": self.mean_effective_norm_pixel,
            "seconds": self.seconds,
            "total_seconds": self.total_seconds,
        }
        if self.source_test is not None:
            point["source_fooling_rate_fit"] = self.source_fit
            point["source_fooling_rate_test"] = self.source_test
        return point


@dataclass(frozen=True)
class PerSampleCurvePoint:
    """Per-sample attacks at one budget ``eps``: robust accuracy, fooling rate, times and the
    adversarial inputs' sizes. In a transfer run, ``source_robust`` is the generating model's."""

    eps: float
    robust: Rate
    fooling: Rate
    seconds: float
    total_seconds: float
    max_size: float
    mean_size: float
    source_robust: float | None = None

    budget_key: ClassVar[str] = "eps"
    rate_key: ClassVar[str] = "fooling_rate"

    @property
    def budget(self) -> float:
        return self.eps

    def to_dict(self) -> dict[str, Any]:
        point = {
            "eps": self.eps,
            **_rate_entries("robust_accuracy", self.robust),
            **_rate_entries("fooling_rate", self.fooling),
            "seconds": self.seconds,
            "total_seconds": self.total_seconds,
            "max_size": self.max_size,
            "mean_size": self.mean_size,
        }
        if self.source_robust is not None:
            point["source_robust_accuracy"] = self.source_robust
        return point


CurvePoint = UniversalCurvePoint | PerSampleCurvePoint


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation, min and max of one number over ``runs`` seeds."""

    mean: float
    std: float
    min: float
    max: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        s = spread(values)
        return cls(s["mean"], s["std"], s["min"], s["max"], int(s["runs"]))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max, "runs": self.runs}


@dataclass(frozen=True)
class SeedSpread:
    """The spread over seeds at one budget (the fit fooling rate only for universal attacks)."""

    budget_key: str
    budget: float
    fooling_rate_test: Spread
    robust_accuracy: Spread
    total_seconds: Spread
    fooling_rate_fit: Spread | None = None

    @classmethod
    def over(cls, points: Sequence[CurvePoint]) -> SeedSpread:
        """The same budget's point of every seed's curve."""
        first = points[0]
        fits = [p.fit.value for p in points if isinstance(p, UniversalCurvePoint)]
        return cls(first.budget_key, first.budget,
                   Spread.of([p.fooling.value for p in points]),
                   Spread.of([p.robust.value for p in points]),
                   Spread.of([p.total_seconds for p in points]),
                   Spread.of(fits) if isinstance(first, UniversalCurvePoint) else None)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        entry = {
            self.budget_key: self.budget,
            "fooling_rate_test": self.fooling_rate_test.to_dict(),
            "robust_accuracy": self.robust_accuracy.to_dict(),
            "total_seconds": self.total_seconds.to_dict(),
        }
        if self.fooling_rate_fit is not None:
            entry["fooling_rate_fit"] = self.fooling_rate_fit.to_dict()
        return entry


@dataclass(frozen=True)
class SeedRun:
    """One seed's curve and its total seconds."""

    seed: int
    curve: Sequence[CurvePoint]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "curve": [p.to_dict() for p in self.curve], "seconds": self.seconds}


@dataclass(frozen=True)
class SeedSummary:
    """Runs that differ only in their seed: the spread per budget and each seed's own curve."""

    seeds: list[int]
    across: list[SeedSpread]
    per_seed: list[SeedRun]

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "across_seeds": [s.to_dict() for s in self.across],
                "per_seed": [r.to_dict() for r in self.per_seed]}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AttackReport:
    """What every report adds after its experiment: the spread over seeds, the files written
    (report key -> path, in writing order) and the units the budget was given in."""

    seeds: SeedSummary | None = None
    files: dict[str, str] = field(default_factory=dict)
    budget_units: str | None = None
    budget_given: float | list[float] | None = None

    def _finish(self, entries: dict[str, Any]) -> dict[str, Any]:
        if self.seeds is not None:
            entries.update(self.seeds.to_dict())
        entries.update(self.files)
        if self.budget_units is not None:
            entries["budget_units"] = self.budget_units
        if self.budget_given is not None:
            entries["budget_given"] = self.budget_given
        return entries


def one_or_all(values: list[Any]) -> Any:
    """One budget: the value itself; a sweep: one entry per budget."""
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class UniversalReport(AttackReport):
    """A universal attack fitted on ``fit_samples`` and scored on ``test_samples`` at each
    budget of ``curve``; ``fit_seconds`` is the fit shared by every budget."""

    method: str
    norm: str
    target_class: int | None
    clean: Rate
    fit_samples: int
    test_samples: int
    iterations: int
    history_fit: list[float]
    mode: str
    budget_handling: str
    extra: dict[str, Any]
    curve: list[UniversalCurvePoint]
    fit_seconds: float

    @property
    def seconds(self) -> float:
        return self.fit_seconds + sum(p.seconds for p in self.curve)

    def to_dict(self) -> dict[str, Any]:
        points = [p.to_dict() for p in self.curve]
        entries: dict[str, Any] = {
            "method": self.method,
            "norm": self.norm,
            "target_class": self.target_class,
            **_rate_entries("clean_accuracy", self.clean),
            "fit_samples": self.fit_samples,
            "test_samples": self.test_samples,
            "iterations": self.iterations,
            "history_fit": self.history_fit,
            "mode": self.mode,
            "budget_handling": self.budget_handling,
            **self.extra,
        }
        for key in points[0]:
            entries[key] = one_or_all([p[key] for p in points])
        entries["seconds"] = self.seconds  # the run's total, where the per-budget seconds sit
        entries["fit_seconds"] = self.fit_seconds
        entries["curve"] = points
        return self._finish(entries)


@dataclass(frozen=True)
class PerSampleReport(AttackReport):
    """Per-sample attacks on ``test_samples`` held-out inputs at each budget of ``curve``;
    ``fit_seconds`` is the work shared by every budget (a minimization attack's one run)."""

    method: str
    norm: str
    eps_units: str
    backend: str
    clean: Rate
    curve: list[PerSampleCurvePoint]
    fit_seconds: float
    budget_handling: str
    test_samples: int
    mode: str

    @property
    def seconds(self) -> float:
        return self.fit_seconds + sum(p.seconds for p in self.curve)

    @property
    def budgets(self) -> list[float]:
        return [p.eps for p in self.curve]

    def to_dict(self) -> dict[str, Any]:
        return self._finish({
            "method": self.method,
            "norm": self.norm,
            "eps": self.budgets,
            "eps_units": self.eps_units,
            "backend": self.backend,
            **_rate_entries("clean_accuracy", self.clean),
            "robust_accuracy": [p.robust.value for p in self.curve],
            "fooling_rate_fit": None,
            "fooling_rate_test": [p.fooling.value for p in self.curve],
            "seconds": self.seconds,
            "fit_seconds": self.fit_seconds,
            "budget_handling": self.budget_handling,
            "test_samples": self.test_samples,
            "curve": [p.to_dict() for p in self.curve],
            "mode": self.mode,
        })  # fmt: skip


@dataclass(frozen=True)
class MatrixReport(AttackReport):
    """Every source's attack scored on every target at one budget (``budget_key`` names it);
    ``clean`` is each target's clean accuracy, ``seconds_per_source`` the generation times."""

    method: str
    norm: str
    budget_key: str
    budget: float
    table: TransferMatrix
    clean: dict[str, Rate]
    seconds_per_source: list[float]
    test_samples: int

    def to_dict(self) -> dict[str, Any]:
        return self._finish({
            "method": self.method,
            "norm": self.norm,
            self.budget_key: self.budget,
            "matrix": {**self.table.to_dict(), "orientation": MATRIX_ORIENTATION},
            "clean_accuracy": {name: rate.value for name, rate in self.clean.items()},
            "clean_accuracy_ci95": {name: list(rate.ci95) for name, rate in self.clean.items()},
            "seconds": sum(self.seconds_per_source),
            "seconds_per_source": self.seconds_per_source,
            "test_samples": self.test_samples,
        })  # fmt: skip


Report = UniversalReport | PerSampleReport | MatrixReport
