"""Small statistics shared by reports: Wilson score intervals for proportions, mean and spread
over repeated runs (seeds)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

from odekit.errors import UsageError


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which matters for fooling rates near 0% or 100% on a few hundred images. With
    n = 0 nothing is known: (0, 1)."""
    if not 0.0 < confidence < 1.0 or confidence != confidence:
        raise UsageError(f"confidence must lie in (0, 1), got {confidence}")
    if n < 0 or not 0 <= successes <= n:
        raise UsageError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 or n successes the bound is exactly 0 or 1; round-off must not push it past
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Proportion:
    """``successes`` of ``n`` with its Wilson 95% interval."""

    successes: int
    n: int

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    def describe(self) -> str:
        low, high = self.ci95
        return f"{100 * self.rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={self.n})"


def proportion_of_rate(rate: float, n: int) -> Proportion | None:
    """The count behind a rate measured on ``n`` samples (None when nothing was measured)."""
    return Proportion(round(rate * n), n) if n > 0 and math.isfinite(rate) else None


def accuracy_text(rate: float, n: int) -> str:
    """'97.22% [95.0, 98.5] n=360': the accuracy, its Wilson 95% interval and the sample count."""
    share = proportion_of_rate(rate, n)
    if share is None:
        return f"{100 * rate:.2f}% n={n}"
    low, high = share.ci95
    return f"{100 * rate:.2f}% [{100 * low:.1f}, {100 * high:.1f}] n={n}"


def accuracy_fields(rate: float, n: int) -> dict[str, object]:
    """The sample count and Wilson 95% interval that go with an accuracy measured on ``n`` samples."""
    share = proportion_of_rate(rate, n)
    return {"accuracy_n": n, "accuracy_ci95": list(share.ci95) if share else None}


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (0 for one value), min and max of repeated runs."""
    if not values:
        raise UsageError("spread needs at least one value")
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "runs": len(vals),
    }
