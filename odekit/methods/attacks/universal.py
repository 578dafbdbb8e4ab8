"""Universal perturbations: recursive active subspace (thesis Algorithm 4), UAP, random. Every
one can be targeted (``target``). Its two refinements (as+uap, as-k) live in `refined`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from odekit.errors import NumericalError, UsageError
from odekit.linalg import dominant_direction
from odekit.linalg.active import dominant_direction_across_ranks
from odekit.methods.attacks.base import (
    FixedEpsilonAttack,
    Job,
    MinimizationAttack,
    UniversalAttack,
    UniversalResult,
    UniversalSettings,
    VectorFit,
    check_count,
    check_nonnegative,
    check_positive,
    predict_on,
)
from odekit.methods.attacks.deepfool import deepfool
from odekit.methods.attacks.linesearch import line_search
from odekit.methods.attacks.space import apply_perturbation, scale_to
from odekit.progress import Progress, silent_if_none
from odekit.streaming import per_sample_input_grads

Fit = tuple[Tensor, int, list[float], dict[str, Any]]
MAX_STEP = 1e6  # pixel units: far beyond any [0, 1] box diagonal of a real input


def _input_grads(model: nn.Module, x: Tensor, labels: Tensor, batch_size: int) -> Tensor:
    """Per-sample cross-entropy input gradients against ``labels``, flattened (N, D)."""
    if len(x) == 0:  # a rank whose shard has nothing left to fool
        return x.new_zeros(0, x[0:1].flatten(1).shape[1])
    return torch.cat([
        per_sample_input_grads(model, x[i : i + batch_size], labels[i : i + batch_size])
        .reshape(min(batch_size, len(x) - i), -1)
        for i in range(0, len(x), batch_size)
    ])  # fmt: skip


def _not_yet(pred: Tensor, clean: Tensor, target: int | None) -> Tensor:
    """Samples still to fool: prediction unchanged, or (targeted) not on the target yet."""
    if target is None:
        return pred == clean
    return (pred != target) & (clean != target)


@dataclass(frozen=True)
class ActiveSubspaceSettings(UniversalSettings):
    """Algorithm 4. ``s0`` (pixel units) defaults to 2*delta, the ball's diameter; the thesis
    code starts at delta^2 and halves 10 times (gamma = 0.5, ``backtrack`` = 10). It stops after
    more than ``alpha`` = 10 failed line searches, or (as the thesis code does) more than
    ``alpha`` iterations without a new best attack ratio. In a sweep, each budget below the
    largest continues the scaled vector for ``sweep_refine`` more iterations (0: scaling only)."""

    s0: float | None = None
    gamma: float = 0.5
    backtrack: int = 10
    alpha: int = 10
    max_iter: int = 100
    sweep_refine: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("sweep-refine", self.sweep_refine, 0)
        if self.s0 is not None:
            check_positive("s0", self.s0, "s0 is the first step length tried, in pixel units")
            if self.s0 > MAX_STEP:
                # float32 would turn such a step into inf (and inf * 0 into NaN)
                raise UsageError(f"s0 must be at most {MAX_STEP:g}, got {self.s0:g}",
                                 "any step beyond the ball's diameter is projected back anyway")
        if not 0.0 < self.gamma < 1.0:
            raise UsageError(
                f"gamma must lie in (0, 1), got {self.gamma}", "the thesis uses gamma = 0.5"
            )
        check_count("backtrack", self.backtrack, 1)
        check_count("alpha", self.alpha, 0)
        check_count("max-iter", self.max_iter, 1)

    @property
    def first_step(self) -> float:
        return self.first_step_at(self.delta)

    def first_step_at(self, eps: float) -> float:
        return self.s0 if self.s0 is not None else 2.0 * eps


class ActiveSubspaceAttack(MinimizationAttack[UniversalResult], UniversalAttack):
    """A sweep fits the AS vector once, at the largest budget, and scales it to the others.
    The vector is not quite budget-free (a fit at a smaller budget ends elsewhere), so each
    smaller budget then runs ``sweep_refine`` warm-started iterations, which never lose fit
    samples and cost a fraction of a fit."""

    name = "active-subspace"
    summary = "universal: recursive active-subspace direction (thesis Algorithm 4)"
    settings_type = ActiveSubspaceSettings
    supports_distributed = True

    def _restrict(self, job: Job, raw: VectorFit, eps: float) -> UniversalResult:
        result = super()._restrict(job, raw, eps)
        refine = self.settings.sweep_refine
        if eps < raw.eps and refine > 0:
            assert job.clean is not None
            v, iterations, _, _ = self.iterate(job.model, job.x, job.clean, eps, result.v, refine,
                                               job.batch_size)  # fmt: skip
            result.v = self.project(v, eps).detach()
            result.extra["sweep_refine_iterations"] = iterations
        return result

    def _any_left(self, keep: Tensor) -> bool:
        """Whether any fit sample (on any rank) is still to fool."""
        left = float(keep.sum())
        if self.dist is not None:
            (left,) = self.dist.sum_numbers(left)
        return left > 0

    def _direction(self, model: nn.Module, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
        """Dominant eigenvector of E[grad c grad c^T] with c = cross-entropy against ``target``."""
        grads = _input_grads(model, x, target, batch_size)
        if self.dist is None:
            d = dominant_direction(grads)
        else:  # exact: the Gram matrices of every rank's shard are summed
            d = dominant_direction_across_ranks(grads, self.dist)
        d = d.reshape(x.shape[1:])
        # the steepest unit step of the chosen norm along d
        return d if self.settings.norm == "2" else d.sign()

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> Fit:
        v0 = x.new_zeros(x.shape[1:])  # (a rank's shard may be empty)
        return self.iterate(model, x, clean, eps, v0, self.settings.max_iter, batch_size, progress)

    def iterate(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        v0: Tensor,
        max_iter: int,
        batch_size: int,
        progress: Progress | None = None,
    ) -> Fit:
        """Algorithm 4 from ``v0`` (zero: the thesis' start) for at most ``max_iter`` iterations;
        the result never fools fewer fit samples than ``v0``."""
        s = self.settings
        v = v0
        ratio = self.success_rate(model, x, v, clean, batch_size) if bool(v0.any()) else 0.0
        best_v, best_ratio = v.clone(), ratio
        failures, stale, iterations = 0, 0, 0
        history: list[float] = []
        bar = silent_if_none(progress)
        steps = [s.first_step_at(eps)]
        for _ in range(s.backtrack - 1):
            steps.append(steps[-1] * s.gamma)
        pred = predict_on(model, apply_perturbation(x, v), batch_size)
        for _ in bar.track(range(max_iter), max_iter, "active-subspace"):
            iterations += 1
            keep = _not_yet(pred, clean, self.target)
            if not self._any_left(keep):
                break
            labels = clean[keep] if self.target is None else torch.full_like(clean[keep], self.target)
            try:
                d = self._direction(model, apply_perturbation(x[keep], v), labels, batch_size)
            except NumericalError:
                break  # zero gradients everywhere (saturated softmax): nothing left to follow
            # Algorithm 4: without an improving step, still move by the smallest step tried and
            # count a failure; the best vector seen is what we return
            if self.dist is None or self.dist.world_size == 1:
                v, ratio, accepted, pred = line_search(
                    model, x, clean, v, pred, d, ratio, steps, lambda u: self.project(u, eps), batch_size, self.target
                )
            else:
                v, ratio, accepted = self._sharded_line_search(model, x, clean, v, d, ratio, steps, eps, batch_size)
                pred = predict_on(model, apply_perturbation(x, v), batch_size)
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


    def _sharded_line_search(
        self, model: nn.Module, x: Tensor, clean: Tensor, v: Tensor, d: Tensor, ratio: float, steps: list[float],
        eps: float, batch_size: int,
    ) -> tuple[Tensor, float, bool]:  # fmt: skip
        """`line_search` over every rank's shard: each try scored in full (the ranks sum counts)."""
        cand_v, cand_ratio = v, ratio
        for step in steps:
            v_pos, v_neg = self.project(v + step * d, eps), self.project(v - step * d, eps)
            r_pos = self.success_rate(model, x, v_pos, clean, batch_size)
            r_neg = self.success_rate(model, x, v_neg, clean, batch_size)
            cand_v, cand_ratio = (v_pos, r_pos) if r_pos >= r_neg else (v_neg, r_neg)
            if cand_ratio > ratio:
                return cand_v, cand_ratio, True
        return cand_v, cand_ratio, False


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
        check_count("max-passes", self.max_passes, 1)
        check_count("deepfool steps", self.df_steps, 1)
        check_count("candidates", self.candidates, 2)
        check_count("chunk", self.chunk, 1)
        if not 0.0 < self.target_fooling <= 1.0:
            raise UsageError(f"target-fooling must lie in (0, 1], got {self.target_fooling}",
                             "it is the fit fooling rate at which UAP stops, e.g. 0.8")
        check_nonnegative("overshoot", self.overshoot)


class UAPAttack(FixedEpsilonAttack[UniversalResult], UniversalAttack):
    name = "uap"
    summary = "universal: UAP (Moosavi-Dezfooli et al. 2017), DeepFool steps accumulated"
    settings_type = UAPSettings

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> Fit:
        v0 = torch.zeros_like(x[0])
        best_v, passes, history, raw = self.passes(
            model, x, clean, eps, generator, batch_size, progress, v0, self.settings.max_passes
        )
        return best_v, passes, history, {"pass_fooling_rates_raw": raw}

    def one_pass(self, model: nn.Module, x: Tensor, clean: Tensor, eps: float, v: Tensor,
                 generator: torch.Generator, batch_size: int) -> Tensor:  # fmt: skip
        """One UAP pass over ``x`` in a seeded order, from ``v``."""
        s = self.settings
        order = torch.randperm(len(x), generator=generator).to(x.device)
        target = self.target
        # small chunks keep UAP's sequential character (v changes between chunks) while
        # batching DeepFool; already-fooled samples are skipped (the reference code did not)
        for start in range(0, len(x), s.chunk):
            idx = order[start : start + s.chunk]
            xv = apply_perturbation(x[idx], v)
            pred = predict_on(model, xv, batch_size)
            todo = _not_yet(pred, clean[idx], target)
            if not bool(todo.any()):
                continue
            ref = clean[idx][todo]
            goal = None if target is None else torch.full_like(ref, target)
            r = deepfool(model, xv[todo], ref, norm=s.norm, steps=s.df_steps,
                         overshoot=s.overshoot, candidates=s.candidates, target=goal)  # fmt: skip
            with torch.no_grad():
                after = predict_on(model, apply_perturbation(xv[todo], r), batch_size)
            fooled = ~_not_yet(after, ref, target)
            for dr in r[fooled]:
                v = self.project(v + dr, eps)
        return v

    def passes(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
        v0: Tensor,
        max_passes: int,
        patience: int | None = None,
    ) -> tuple[Tensor, int, list[float], list[float]]:
        """Up to ``max_passes`` passes from ``v0`` (fewer after ``patience`` rejected passes in
        a row); returns (best v, passes, best-rate history, raw per-pass rates). The best vector
        never fools fewer fit samples than ``v0``."""
        s = self.settings
        rejected = 0
        v = self.project(v0, eps)
        best_v, best_rate = v.clone(), self.success_rate(model, x, v, clean, batch_size)
        history: list[float] = []
        raw: list[float] = []
        passes = 0
        bar = silent_if_none(progress)
        for _ in bar.track(range(max_passes), max_passes, f"{self.name} passes"):
            if best_rate >= s.target_fooling:
                break
            passes += 1
            v = self.one_pass(model, x, clean, eps, v, generator, batch_size)
            rate = self.success_rate(model, x, v, clean, batch_size)
            raw.append(rate)
            # projected accumulation can undo earlier passes; a pass that lowers the fit fooling
            # rate is rejected (the next pass restarts from the best vector with a new order)
            if rate >= best_rate:
                best_v, best_rate, rejected = v.clone(), rate, 0
            else:
                v, rejected = best_v.clone(), rejected + 1
            history.append(best_rate)
            bar.update(fooling=round(best_rate, 4))
            if patience is not None and rejected >= patience:
                break
        return best_v, passes, history, raw


class RandomAttack(MinimizationAttack[UniversalResult], UniversalAttack):
    """A Gaussian direction, drawn once and scaled to every budget."""

    name = "random"
    summary = "universal baseline: Gaussian direction scaled to the budget norm"
    settings_type = UniversalSettings
    supports_distributed = True  # the same seed draws the same direction on every rank

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> Fit:
        g = torch.randn(x.shape[1:], generator=generator).to(x.device)
        v = scale_to(g.unsqueeze(0), self.settings.norm, eps).squeeze(0)
        return v, 1, [self.success_rate(model, x, v, clean, batch_size)], {}
