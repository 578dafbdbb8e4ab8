"""Per-sample attacks for robust accuracy: FGSM, PGD (random start, restarts), DeepFool.

``backend="torch"`` runs our implementation on any device; ``backend="foolbox"`` runs
foolbox 3's attack on the same `PixelModel` with bounds (0, 1) (the thesis used foolbox).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.errors import UsageError
from odekit.methods.attacks.base import (
    FixedEpsilonAttack,
    MinimizationAttack,
    PerSampleAttack,
    PerSampleResult,
    PerSampleSettings,
    check_count,
    check_nonnegative,
    check_positive,
)
from odekit.methods.attacks.deepfool import deepfool
from odekit.methods.attacks.space import lp_norms, project

BACKENDS = ("torch", "foolbox")


def _check_backend(backend: str) -> str:
    key = backend.strip().lower()
    if key not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'", f"choose one of: {', '.join(BACKENDS)}")
    return key


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(xr), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xr)
    return g


def _unit_step(g: Tensor, norm: str) -> Tensor:
    """Steepest ascent direction of unit ``norm`` (sign for linf, normalised for l2)."""
    if norm == "inf":
        return g.sign()
    n = lp_norms(g, "2").clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.dim() - 1)))


def _foolbox_run(model: nn.Module, attack: Any, x: Tensor, y: Tensor, eps: float) -> Tensor:
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
    _, clipped, _ = attack(fmodel, x, y, epsilons=[eps])
    return clipped[0]


@dataclass(frozen=True)
class FGSMSettings(PerSampleSettings):
    """One step of size eps: sign of the gradient (linf, FGSM) or the normalised gradient (l2, FGM)."""

    backend: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "backend", _check_backend(self.backend))


class FGSMAttack(FixedEpsilonAttack[PerSampleResult], PerSampleAttack):
    name = "fgsm"
    summary = "per-sample: fast gradient (sign) method, one step"
    settings_type = FGSMSettings

    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> tuple[Tensor, None]:
        s = self.settings
        if s.backend == "foolbox":
            import foolbox as fb

            attack = fb.attacks.FGSM() if s.norm == "inf" else fb.attacks.FGM()
            return _foolbox_run(model, attack, x, y, eps), None
        return x + eps * _unit_step(_loss_grad(model, x, y), s.norm), None


@dataclass(frozen=True)
class PGDSettings(PerSampleSettings):
    """Madry et al.: ``steps`` projected steps of rel_stepsize*eps from a random start in the
    ball; ``restarts`` independent runs, a sample counts as broken if any run breaks it.
    Defaults: 40 steps (linf) or 50 (l2), as in foolbox, of 2.5*eps/steps each (Madry et al.),
    so the iterate can cross the ball whatever the number of steps."""

    backend: str = "torch"
    steps: int | None = None
    rel_stepsize: float | None = None
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "backend", _check_backend(self.backend))
        if self.steps is not None:
            check_count("steps", self.steps, 1)
        if self.rel_stepsize is not None:
            check_positive("rel-stepsize", self.rel_stepsize)
        check_count("restarts", self.restarts, 1)

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else (40 if self.norm == "inf" else 50)

    @property
    def rel_step(self) -> float:
        return self.rel_stepsize if self.rel_stepsize is not None else 2.5 / self.n_steps


def _random_in_ball(x: Tensor, norm: str, eps: float, generator: torch.Generator) -> Tensor:
    if norm == "inf":
        r = torch.rand(x.shape, generator=generator) * 2 - 1
        return (r * eps).to(x.device)
    g = torch.randn(x.shape, generator=generator)
    flat = g.reshape(len(x), -1)
    direction = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # uniform in the ball: radius ~ eps * U^(1/D)
    radius = eps * torch.rand(len(x), 1, generator=generator) ** (1.0 / flat.shape[1])
    return (direction * radius).reshape(x.shape).to(x.device)


class PGDAttack(FixedEpsilonAttack[PerSampleResult], PerSampleAttack):
    name = "pgd"
    summary = "per-sample: projected gradient descent, random start, restarts"
    settings_type = PGDSettings

    def _once(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> Tensor:
        s = self.settings
        if s.backend == "foolbox":
            import foolbox as fb

            cls = fb.attacks.LinfPGD if s.norm == "inf" else fb.attacks.L2PGD
            attack = cls(rel_stepsize=s.rel_step, steps=s.n_steps, random_start=s.random_start)
            return _foolbox_run(model, attack, x, y, eps)
        delta = (
            _random_in_ball(x, s.norm, eps, generator) if s.random_start else torch.zeros_like(x)
        )
        x_adv = (x + delta).clamp(0.0, 1.0)
        step = s.rel_step * eps
        for _ in range(s.n_steps):
            x_adv = x_adv + step * _unit_step(_loss_grad(model, x_adv, y), s.norm)
            x_adv = (x + project(x_adv - x, s.norm, eps)).clamp(0.0, 1.0)
        return x_adv

    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> tuple[Tensor, None]:
        best = self._once(model, x, y, eps, generator)
        for _ in range(self.settings.restarts - 1):
            with torch.no_grad():
                broken = model(best).argmax(1) != y
            if bool(broken.all()):
                break
            other = self._once(model, x, y, eps, generator)
            best = torch.where(broken.view(-1, *([1] * (x.dim() - 1))), best, other)
        return best, None


@dataclass(frozen=True)
class DeepFoolSettings(PerSampleSettings):
    """Minimal-norm DeepFool, then restricted to the eps ball (as foolbox does with epsilons)."""

    backend: str = "torch"
    steps: int = 50
    overshoot: float = 0.02
    candidates: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "backend", _check_backend(self.backend))
        check_count("steps", self.steps, 1)
        check_count("candidates", self.candidates, 2)
        check_nonnegative("overshoot", self.overshoot)


class DeepFoolAttack(MinimizationAttack[PerSampleResult], PerSampleAttack):
    """Runs once per call (a minimal perturbation); each budget clips it to its ball."""

    name = "deepfool"
    summary = "per-sample: DeepFool minimal perturbation, restricted to eps"
    settings_type = DeepFoolSettings

    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> tuple[Tensor, None]:
        s = self.settings
        if s.backend == "foolbox":
            import foolbox as fb

            cls = fb.attacks.LinfDeepFoolAttack if s.norm == "inf" else fb.attacks.L2DeepFoolAttack
            attack = cls(steps=s.steps, candidates=s.candidates, overshoot=s.overshoot)
            return _foolbox_run(model, attack, x, y, eps), None
        with torch.no_grad():
            pred = model(x).argmax(1)
        r = deepfool(
            model,
            x,
            pred,
            norm=s.norm,
            steps=s.steps,
            overshoot=s.overshoot,
            candidates=s.candidates,
            labels=y,
        )
        return x + r, None
