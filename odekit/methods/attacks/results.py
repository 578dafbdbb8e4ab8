"""What an attack call works on (`Job`), its raw outputs before a budget restricts them
(`VectorFit`, `BatchAttempt`) and what it returns per budget (a universal vector, or
adversarial inputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

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


@dataclass
class Job:
    """What one call works on: the model (eval mode), inputs on its device (universal) or on
    theirs (per-sample, moved batch by batch), labels, clean predictions."""

    model: nn.Module
    x: Tensor
    labels: Tensor | None
    clean: Tensor | None
    batch_size: int
    device: torch.device


@dataclass
class VectorFit:
    """A universal attack's raw output: the vector found at budget ``eps``."""

    v: Tensor
    eps: float
    iterations: int
    history: list[float]
    extra: dict[str, Any]


@dataclass
class BatchAttempt:
    """A per-sample attack's raw output on one batch: inputs, attacked inputs, sizes (or None)."""

    x: Tensor
    x_adv: Tensor
    size: Tensor | None
