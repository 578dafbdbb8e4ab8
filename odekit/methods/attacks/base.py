"""Attack base classes (foolbox-3 style): the base owns bounds, clipping, projection, norms and
bookkeeping; subclasses implement `run`. `ATTACKS` is the registry `--method` is built from."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from odekit.device import synchronize
from odekit.errors import UsageError
from odekit.methods.attacks.space import (
    apply_perturbation,
    check_in_box,
    lp_norm,
    lp_norms,
    parse_norm,
    project,
)
from odekit.progress import Progress
from odekit.registry import Registry


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def predict_on(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted classes of ``x`` (on the model's device)."""
    dev = model_device(model)
    out = [model(x[i : i + batch_size].to(dev)).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=dev)


def fooling_rate(
    model: nn.Module, x: Tensor, v: Tensor, clean_pred: Tensor, batch_size: int = 512
) -> float:
    """Eq. 6.37: fraction of samples whose prediction changes under x + v (clipped to the box)."""
    if len(x) == 0:
        return float("nan")
    pred = predict_on(model, apply_perturbation(x, v), batch_size)
    return float((pred != clean_pred.to(pred.device)).float().mean())


def check_positive(name: str, value: float, hint: str = "") -> None:
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"{name} must be a positive finite number, got {value}", hint or None)


@dataclass(frozen=True)
class UniversalSettings:
    """Budget shared by universal attacks: ``delta`` is the norm bound in [0, 1] pixel units."""

    norm: str = "2"
    delta: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_norm(self.norm))
        check_positive(
            "delta", self.delta, "delta is the perturbation norm bound in [0, 1] pixel units"
        )


@dataclass(frozen=True)
class PerSampleSettings:
    """Settings shared by per-sample attacks (the budget eps comes with each call)."""

    norm: str = "inf"

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_norm(self.norm))


class Attack(ABC):
    """Common bookkeeping; ``name``/``kind`` identify the entry in `ATTACKS`."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "universal" or "per-sample"
    settings_type: ClassVar[type]
    settings: Any

    def __init__(self, settings: Any) -> None:
        if not isinstance(settings, self.settings_type):
            raise TypeError(f"{type(self).__name__} takes {self.settings_type.__name__}")
        self.settings = settings


@dataclass
class UniversalResult:
    """One universal vector (pixel units, shape of one sample) and how it was found."""

    v: Tensor
    fooling_rate_fit: float
    seconds: float
    iterations: int
    history: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def norm(self, norm: str) -> float:
        return lp_norm(self.v, norm)


class UniversalAttack(Attack):
    """Finds one v with ||v|| <= delta that changes many predictions; subclasses implement `run`."""

    kind = "universal"
    settings_type = UniversalSettings

    def __call__(
        self,
        model: nn.Module,
        x_fit: Tensor,
        *,
        seed: int = 0,
        batch_size: int = 256,
        progress: Progress | None = None,
    ) -> UniversalResult:
        check_in_box(x_fit, "the fitting data")
        model.eval()
        dev = model_device(model)
        x_fit = x_fit.to(dev)
        clean = predict_on(model, x_fit, batch_size)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        synchronize(dev)
        start = time.perf_counter()
        v, iterations, history, extra = self.run(
            model, x_fit, clean, generator, batch_size, progress
        )
        v = self.finalize(v.to(dev))
        synchronize(dev)
        seconds = time.perf_counter() - start
        rate = fooling_rate(model, x_fit, v, clean, batch_size)
        return UniversalResult(v.detach(), rate, seconds, iterations, history, extra)

    # helpers for subclasses ---------------------------------------------------------------
    def project(self, v: Tensor) -> Tensor:
        """Onto the budget ball and inside [-1, 1] (no pixel moves by more than the box width)."""
        s = self.settings
        return project(v.clamp(-1.0, 1.0).unsqueeze(0), s.norm, s.delta).squeeze(0)

    def finalize(self, v: Tensor) -> Tensor:
        v = self.project(v)
        assert lp_norm(v, self.settings.norm) <= self.settings.delta * (1 + 1e-5)
        return v

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> tuple[Tensor, int, list[float], dict[str, Any]]:
        """Return (v, iterations, fit fooling-rate history, extra report fields)."""


@dataclass
class PerSampleResult:
    """Adversarial inputs (pixels, clipped, within budget) and their budget-norm sizes."""

    x_adv: Tensor
    sizes: Tensor  # per sample, in the attack's own norm (pixel units; pixels of displacement for adef)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class PerSampleAttack(Attack):
    """One adversarial input per sample within budget eps; subclasses implement `run`."""

    kind = "per-sample"
    settings_type = PerSampleSettings
    budget_name: ClassVar[str] = "eps"

    @property
    def norm_label(self) -> str:
        return self.settings.norm

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        *,
        seed: int = 0,
        batch_size: int = 256,
        progress: Progress | None = None,
    ) -> PerSampleResult:
        check_positive("eps", eps, "eps is the per-sample budget in [0, 1] pixel units")
        check_in_box(x, "the evaluation data")
        model.eval()
        dev = model_device(model)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        advs, sizes = [], []
        extra: dict[str, Any] = {}
        synchronize(dev)
        start = time.perf_counter()
        starts = range(0, len(x), batch_size)
        iterator = (
            progress.track(starts, len(starts), f"{self.name} eps={eps:.4g}")
            if progress
            else starts
        )
        for i in iterator:
            xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
            x_adv, size = self.run(model, xb, yb, eps, generator)
            x_adv, size = self.restrict(xb, x_adv.detach(), eps, size)
            advs.append(x_adv)
            sizes.append(size)
        synchronize(dev)
        seconds = time.perf_counter() - start
        return PerSampleResult(torch.cat(advs), torch.cat(sizes), seconds, extra)

    def restrict(
        self, x: Tensor, x_adv: Tensor, eps: float, size: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Clip to the box and project onto the eps ball (minimal-norm attacks may overshoot)."""
        delta = project(x_adv.clamp(0.0, 1.0) - x, self.settings.norm, eps)
        x_adv = apply_perturbation(x, delta)
        return x_adv, lp_norms(x_adv - x, self.settings.norm)

    @abstractmethod
    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """Return (x_adv, per-sample size or None to measure it in the lp norm)."""


ATTACKS: Registry[type[Attack]] = Registry("attack method")
