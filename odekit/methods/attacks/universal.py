"""Universal perturbations: recursive active subspace (thesis Algorithm 4), UAP, random."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from odekit.errors import NumericalError, UsageError
from odekit.linalg import dominant_direction
from odekit.methods.attacks.base import (
    UniversalAttack,
    UniversalSettings,
    check_positive,
    fooling_rate,
    predict_on,
)
from odekit.methods.attacks.deepfool import deepfool
from odekit.methods.attacks.space import apply_perturbation, scale_to
from odekit.progress import Progress, silent_if_none
from odekit.streaming import per_sample_input_grads


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value}")


@dataclass(frozen=True)
class ActiveSubspaceSettings(UniversalSettings):
    """Algorithm 4. ``s0`` (pixel units) defaults to 2*delta, the ball's diameter; the thesis
    code starts at delta^2 and halves 10 times (gamma = 0.5, ``backtrack`` = 10). It stops after
    more than ``alpha`` = 10 failed line searches, or (as the thesis code does) more than
    ``alpha`` iterations without a new best attack ratio."""

    s0: float | None = None
    gamma: float = 0.5
    backtrack: int = 10
    alpha: int = 10
    max_iter: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.s0 is not None:
            check_positive("s0", self.s0, "s0 is the first step length tried, in pixel units")
        if not 0.0 < self.gamma < 1.0:
            raise UsageError(
                f"gamma must lie in (0, 1), got {self.gamma}", "the thesis uses gamma = 0.5"
            )
        _check_int("backtrack", self.backtrack, 1)
        _check_int("alpha", self.alpha, 0)
        _check_int("max-iter", self.max_iter, 1)

    @property
    def first_step(self) -> float:
        return self.s0 if self.s0 is not None else 2.0 * self.delta


class ActiveSubspaceAttack(UniversalAttack):
    name = "active-subspace"
    settings_type = ActiveSubspaceSettings

    def _direction(self, model: nn.Module, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
        """Dominant eigenvector of E[grad c grad c^T] with c = cross-entropy against ``target``."""
        grads = [
            per_sample_input_grads(
                model, x[i : i + batch_size], target[i : i + batch_size]
            ).reshape(min(batch_size, len(x) - i), -1)
            for i in range(0, len(x), batch_size)
        ]
        d = dominant_direction(torch.cat(grads)).reshape(x.shape[1:])
        # the steepest unit step of the chosen norm along d
        return d if self.settings.norm == "2" else d.sign()

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> tuple[Tensor, int, list[float], dict[str, Any]]:
        s = self.settings
        v = torch.zeros_like(x[0])
        ratio = 0.0
        best_v, best_ratio = v.clone(), 0.0
        failures, stale, iterations = 0, 0, 0
        history: list[float] = []
        bar = silent_if_none(progress)
        for _ in bar.track(range(s.max_iter), s.max_iter, "active-subspace"):
            iterations += 1
            pred = predict_on(model, apply_perturbation(x, v), batch_size)
            keep = pred == clean
            if not bool(keep.any()):
                break
            try:
                d = self._direction(model, apply_perturbation(x[keep], v), clean[keep], batch_size)
            except NumericalError:
                break  # zero gradients everywhere (saturated softmax): nothing left to follow
            accepted = False
            step = s.first_step
            cand_v, cand_ratio = v, ratio
            for _i in range(s.backtrack):
                v_pos, v_neg = self.project(v + step * d), self.project(v - step * d)
                r_pos = fooling_rate(model, x, v_pos, clean, batch_size)
                r_neg = fooling_rate(model, x, v_neg, clean, batch_size)
                cand_v, cand_ratio = (v_pos, r_pos) if r_pos >= r_neg else (v_neg, r_neg)
                if cand_ratio > ratio:
                    accepted = True
                    break
                step *= s.gamma
            # Algorithm 4: without an improving step, still move by the smallest step tried and
            # count a failure; the best vector seen is what we return
            v, ratio = cand_v, cand_ratio
            failures += 0 if accepted else 1
            history.append(ratio)
            if ratio > best_ratio:
                best_v, best_ratio, stale = v.clone(), ratio, 0
            else:
                stale += 1
            bar.update(fooling=round(best_ratio, 4), failures=failures)
            if failures > s.alpha or stale > s.alpha or best_ratio >= 1.0:
                break
        return best_v, iterations, history, {"failures": failures, "stopped_after_stale": stale}


@dataclass(frozen=True)
class UAPSettings(UniversalSettings):
    """Moosavi-Dezfooli et al. 2017: passes over the data, DeepFool on still-unfooled samples,
    accumulate and project; stop at ``target_fooling`` or after ``max_passes`` (thesis: 10).
    DeepFool runs in chunks of ``chunk`` samples at the current v (v is updated between chunks);
    a pass that lowers the fit fooling rate is rejected, so the rate never falls between passes."""

    max_passes: int = 10
    target_fooling: float = 0.8
    df_steps: int = 10
    overshoot: float = 0.02
    candidates: int = 10
    chunk: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("max-passes", self.max_passes, 1)
        _check_int("deepfool steps", self.df_steps, 1)
        _check_int("candidates", self.candidates, 2)
        _check_int("chunk", self.chunk, 1)
        if not 0.0 < self.target_fooling <= 1.0:
            raise UsageError(f"target-fooling must lie in (0, 1], got {self.target_fooling}")
        if self.overshoot < 0:
            raise UsageError(f"overshoot must be >= 0, got {self.overshoot}")


class UAPAttack(UniversalAttack):
    name = "uap"
    settings_type = UAPSettings

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> tuple[Tensor, int, list[float], dict[str, Any]]:
        s = self.settings
        v = torch.zeros_like(x[0])
        best_v, best_rate = v.clone(), 0.0
        history: list[float] = []
        raw: list[float] = []
        passes = 0
        bar = silent_if_none(progress)
        for _ in bar.track(range(s.max_passes), s.max_passes, "uap passes"):
            passes += 1
            order = torch.randperm(len(x), generator=generator).to(x.device)
            # small chunks keep UAP's sequential character (v changes between chunks) while
            # batching DeepFool; already-fooled samples are skipped (the reference code did not)
            for start in range(0, len(x), s.chunk):
                idx = order[start : start + s.chunk]
                xv = apply_perturbation(x[idx], v)
                pred = predict_on(model, xv, batch_size)
                todo = pred == clean[idx]
                if not bool(todo.any()):
                    continue
                r = deepfool(
                    model,
                    xv[todo],
                    clean[idx][todo],
                    norm=s.norm,
                    steps=s.df_steps,
                    overshoot=s.overshoot,
                    candidates=s.candidates,
                )
                with torch.no_grad():
                    fooled = (
                        predict_on(model, apply_perturbation(xv[todo], r), batch_size)
                        != clean[idx][todo]
                    )
                for dr in r[fooled]:
                    v = self.project(v + dr)
            rate = fooling_rate(model, x, v, clean, batch_size)
            raw.append(rate)
            # projected accumulation can undo earlier passes; a pass that lowers the fit fooling
            # rate is rejected (the next pass restarts from the best vector with a new order)
            if rate >= best_rate:
                best_v, best_rate = v.clone(), rate
            else:
                v = best_v.clone()
            history.append(best_rate)
            bar.update(fooling=round(best_rate, 4))
            if best_rate >= s.target_fooling:
                break
        return best_v, passes, history, {"pass_fooling_rates_raw": raw}


class RandomAttack(UniversalAttack):
    name = "random"
    settings_type = UniversalSettings

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> tuple[Tensor, int, list[float], dict[str, Any]]:
        g = torch.randn(x.shape[1:], generator=generator).to(x.device)
        v = scale_to(g.unsqueeze(0), self.settings.norm, self.settings.delta).squeeze(0)
        return v, 1, [fooling_rate(model, x, v, clean, batch_size)], {}
