"""Settings shared by the two kinds of attack, their default budgets and the validators every
settings dataclass uses in ``__post_init__``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from odekit.errors import UsageError
from odekit.methods.attacks.space import parse_norm

DEFAULT_DELTA = {"2": 3.0, "inf": 0.15}  # universal, pixel units
DEFAULT_EPS = {"2": [0.5], "inf": [8 / 255]}  # RobustBench per-sample budgets, pixel units
MAX_COUNT = 1_000_000  # iterations, passes, steps, restarts: more is a typo, not a plan


def check_positive(name: str, value: float, hint: str = "") -> None:
    if not value > 0 or not math.isfinite(value):
        raise UsageError(f"{name} must be a positive finite number, got {value}",
                         hint or "give a number > 0 (not nan or inf)")  # fmt: skip


def check_count(name: str, value: int, low: int, high: int = MAX_COUNT) -> None:
    """An integer option in [low, high]."""
    if isinstance(value, bool) or int(value) != value or not low <= value <= high:
        raise UsageError(f"{name} must be an integer in [{low}, {high}], got {value}",
                         f"give a whole number from {low} to {high}")  # fmt: skip


def check_nonnegative(name: str, value: float, hint: str = "") -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"{name} must be a finite number >= 0, got {value}",
                         hint or "give a number >= 0 (not nan or inf)")  # fmt: skip


@dataclass(frozen=True)
class UniversalSettings:
    """Budget shared by universal attacks: ``delta`` is the norm bound in [0, 1] pixel units
    (the default budget of a call). With ``target`` the attack is targeted: it pushes inputs
    towards that class, and success means landing on it."""

    norm: str = "2"
    delta: float = 2.0
    target: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_norm(self.norm))
        check_positive(
            "delta", self.delta, "delta is the perturbation norm bound in [0, 1] pixel units"
        )
        if self.target is not None:
            check_count("target class", self.target, 0, 100_000)


@dataclass(frozen=True)
class PerSampleSettings:
    """Settings shared by per-sample attacks (the budget eps comes with each call)."""

    norm: str = "inf"

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_norm(self.norm))
