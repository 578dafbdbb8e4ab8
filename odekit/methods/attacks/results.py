"""What an attack call returns: a universal vector, or adversarial inputs, per budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from odekit.methods.attacks.space import lp_norm


@dataclass
class UniversalResult:
    """One universal vector (pixel units, shape of one sample) and how it was found.

    ``seconds`` is the time spent on this budget alone, ``shared_seconds`` the fit shared by
    every budget of a sweep (zero for attacks that rerun per budget)."""

    v: Tensor
    fooling_rate_fit: float
    seconds: float
    iterations: int
    history: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    budget: float = float("nan")
    shared_seconds: float = 0.0

    def norm(self, norm: str) -> float:
        return lp_norm(self.v, norm)

    @property
    def total_seconds(self) -> float:
        return self.seconds + self.shared_seconds


@dataclass
class PerSampleResult:
    """Adversarial inputs (pixels, clipped, within budget) and their budget-norm sizes."""

    x_adv: Tensor
    sizes: Tensor  # per sample, in the attack's distance (pixel units; pixels for the T-norm)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    budget: float = float("nan")
    shared_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.seconds + self.shared_seconds
