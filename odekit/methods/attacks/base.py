"""Attack base classes in the foolbox-3 shape.

Every attack is called the same way, ``attack(model, inputs, labels, epsilons)`` (`Attack.__call__`
is final): one budget gives one result, a list of budgets one result per budget. How a sweep is
computed is fixed by one of two bases:

- `FixedEpsilonAttack`: the result depends on the budget, so it reruns per budget (FGSM, PGD,
  UAP, as+uap, AS-k);
- `MinimizationAttack`: runs once, at the largest budget, and each budget restricts that one
  result: minimal perturbations are clipped to the ball (DeepFool, ADef, as foolbox 3 does),
  budget-free directions are scaled (the active-subspace vector, random).

Orthogonally, `UniversalAttack` (one vector for all inputs, fitted on ``inputs``) and
`PerSampleAttack` (one perturbation per input) own bounds, projection and bookkeeping;
concrete attacks implement `run`. `ATTACKS` is the registry ``--method`` is built from.

The call protocol lives here; the pieces it is built from live beside it and are re-exported:
`settings` (settings, default budgets, validators), `results` (what a call works on and returns) and
`predictions` (predictions and success counts, also over the ranks of a torchrun launch).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, final, overload

import torch
from torch import Tensor, nn

from odekit.device import synchronize
from odekit.errors import UsageError
from odekit.methods.attacks.distance import Distance, distance_for
from odekit.methods.attacks.predictions import (
    attack_success,
    fooling_rate,
    gather_shards,
    model_device,
    predict_on,
    summed_over_ranks,
)
from odekit.methods.attacks.results import (
    BatchAttempt,
    Job,
    PerSampleResult,
    UniversalResult,
    VectorFit,
)
from odekit.methods.attacks.settings import (
    DEFAULT_DELTA,
    DEFAULT_EPS,
    MAX_COUNT,
    PerSampleSettings,
    UniversalSettings,
    check_count,
    check_nonnegative,
    check_positive,
)
from odekit.methods.attacks.space import apply_perturbation, check_in_box, lp_norm, parse_norm
from odekit.progress import Progress
from odekit.registry import Registry

if TYPE_CHECKING:
    from odekit.distributed import Distributed

__all__ = [  # the names this module has always offered, whichever module now defines them
    "ATTACKS",
    "DEFAULT_DELTA",
    "DEFAULT_EPS",
    "MAX_COUNT",
    "Attack",
    "BatchAttempt",
    "FixedEpsilonAttack",
    "Job",
    "MinimizationAttack",
    "PerSampleAttack",
    "PerSampleResult",
    "PerSampleSettings",
    "UniversalAttack",
    "UniversalResult",
    "UniversalSettings",
    "VectorFit",
    "attack_success",
    "check_count",
    "check_nonnegative",
    "check_positive",
    "fooling_rate",
    "gather_shards",
    "model_device",
    "predict_on",
    "register_attacks",
    "summed_over_ranks",
]

R = TypeVar("R", UniversalResult, PerSampleResult)


class Attack(ABC, Generic[R]):
    """Common entry point and bookkeeping; ``name`` and ``summary`` identify it in `ATTACKS`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[str]  # "universal" or "per-sample"
    settings_type: ClassVar[type]
    budget_name: ClassVar[str]  # "delta" or "eps"
    reruns_per_budget: ClassVar[bool]  # set by FixedEpsilonAttack / MinimizationAttack
    fixed_distance: ClassVar[Distance | None] = None  # a distance the attack always uses
    # attacks that shard their set over the ranks of a torchrun launch (issue 15): universal fits
    # that sum their statistics over the ranks, and every per-sample attack
    supports_distributed: ClassVar[bool] = False
    settings: Any

    def __init__(self, settings: Any) -> None:
        if not isinstance(settings, self.settings_type):
            raise TypeError(f"{type(self).__name__} takes {self.settings_type.__name__}")
        self.settings = settings
        self.dist: Distributed | None = None  # set per call; None: a single process

    @property
    def distance(self) -> Distance:
        return self.fixed_distance or distance_for(self.settings.norm)

    @classmethod
    @abstractmethod
    def default_budgets(cls, norm: str) -> list[float]:
        """Budgets used when the caller gives none (pixel units for ``norm``)."""

    @overload
    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor | None = None,
        epsilons: float | None = None,
        *,
        seed: int = 0,
        batch_size: int = 256,
        progress: Progress | None = None,
        dist: Distributed | None = None,
    ) -> R: ...

    @overload
    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor | None,
        epsilons: Sequence[float],
        *,
        seed: int = 0,
        batch_size: int = 256,
        progress: Progress | None = None,
        dist: Distributed | None = None,
    ) -> list[R]: ...

    @final
    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor | None = None,
        epsilons: float | Sequence[float] | None = None,
        *,
        seed: int = 0,
        batch_size: int = 256,
        progress: Progress | None = None,
        dist: Distributed | None = None,
    ) -> R | list[R]:
        """Attack ``inputs`` (pixels in [0, 1]) at one budget or each of a list of budgets.
        Universal attacks fit their vector on ``inputs`` against the clean predictions (labels
        are not needed); per-sample attacks need ``labels``. With ``dist`` (a torchrun launch,
        attacks with ``supports_distributed``), every rank passes the whole set, fits on its
        shard and all get the vector one process fitting on the whole set gets."""
        single = epsilons is None or isinstance(epsilons, int | float)
        if epsilons is None:
            budgets = [self._default_budget()]
        elif isinstance(epsilons, int | float):
            budgets = [float(epsilons)]
        else:
            budgets = [float(e) for e in epsilons]
        if not budgets:
            raise UsageError(f"no {self.budget_name} budget given", "pass epsilons=None for the default")
        for eps in budgets:
            check_positive(self.budget_name, eps, f"{self.budget_name} is in {self.distance.unit}")
        check_in_box(inputs, "the fitting data" if self.kind == "universal" else "the evaluation data")
        if dist is not None and dist.world_size > 1:
            if not self.supports_distributed:
                raise UsageError(f"{self.name} cannot fit over several ranks",
                                 "run it as a single process")  # fmt: skip
            shard = dist.shard(len(inputs))
            inputs = inputs[shard.start : shard.stop]
            labels = None if labels is None else labels[shard.start : shard.stop]
        n = len(inputs) if dist is None else sum(dist.sum_numbers(len(inputs)))
        model.eval()
        self.dist = dist
        try:
            job = self._prepare(model, inputs, labels, batch_size)
            results = [self._gathered(r, int(n)) for r in self._solve(job, budgets, seed, progress)]
        finally:
            self.dist = None
        return results[0] if single else results

    def _gathered(self, result: R, n: int) -> R:
        """A distributed call's result for the whole set of ``n`` inputs (per-sample attacks
        gather the ranks' shards; a universal vector is the same on every rank)."""
        return result

    def _default_budget(self) -> float:
        return self.default_budgets(self.distance.key)[-1]

    @staticmethod
    def _clock(device: torch.device) -> float:
        synchronize(device)
        return time.perf_counter()

    @abstractmethod
    def _solve(self, job: Job, budgets: list[float], seed: int, progress: Progress | None) -> list[R]:
        """One result per budget (implemented by the two budget bases)."""

    @abstractmethod
    def _prepare(self, model: nn.Module, x: Tensor, labels: Tensor | None, batch_size: int) -> Job:
        """Checks and set-up shared by every budget of a call."""

    @abstractmethod
    def _generate(self, job: Job, eps: float, generator: torch.Generator,
                  progress: Progress | None) -> Any:  # fmt: skip
        """The attack's raw output at budget ``eps``."""

    @abstractmethod
    def _restrict(self, job: Job, raw: Any, eps: float) -> R:
        """The result at budget ``eps`` from a raw output (timed)."""

    def _finish(self, job: Job, result: R) -> None:
        """Untimed scoring after the result is made."""


class FixedEpsilonAttack(Attack[R]):
    """An attack whose result depends on the budget: a sweep reruns it per budget, budget i
    with generator seed ``seed + i``."""

    reruns_per_budget = True

    @final
    def _solve(self, job: Job, budgets: list[float], seed: int, progress: Progress | None) -> list[R]:
        results = []
        for i, eps in enumerate(budgets):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            start = self._clock(job.device)
            result = self._restrict(job, self._generate(job, eps, generator, progress), eps)
            result.seconds = self._clock(job.device) - start
            self._finish(job, result)
            results.append(result)
        return results


class MinimizationAttack(Attack[R]):
    """An attack run once per call, at the largest budget; each budget restricts that result
    (clips a minimal perturbation to the ball, or scales a budget-free direction). The run is
    ``shared_seconds`` of every result; ``seconds`` is the restriction alone."""

    reruns_per_budget = False

    @final
    def _solve(self, job: Job, budgets: list[float], seed: int, progress: Progress | None) -> list[R]:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        start = self._clock(job.device)
        raw = self._generate(job, max(budgets), generator, progress)
        shared = self._clock(job.device) - start
        results = []
        for eps in budgets:
            start = self._clock(job.device)
            result = self._restrict(job, raw, eps)
            result.seconds = self._clock(job.device) - start
            result.shared_seconds = shared
            self._finish(job, result)
            results.append(result)
        return results


class UniversalAttack(Attack[UniversalResult]):
    """Finds one v with ||v|| <= delta that changes many predictions; subclasses implement `run`
    and inherit one of the budget bases. Budget-free directions (`MinimizationAttack`) are
    scaled from the largest budget to the others."""

    kind = "universal"
    settings_type = UniversalSettings
    budget_name = "delta"

    @classmethod
    def default_budgets(cls, norm: str) -> list[float]:
        return [DEFAULT_DELTA[parse_norm(norm)]]

    def _default_budget(self) -> float:
        return float(self.settings.delta)

    @property
    def target(self) -> int | None:
        return self.settings.target

    def _prepare(self, model: nn.Module, x: Tensor, labels: Tensor | None, batch_size: int) -> Job:
        dev = model_device(model)
        x = x.to(dev)
        return Job(model, x, labels, predict_on(model, x, batch_size), batch_size, dev)

    def _generate(self, job: Job, eps: float, generator: torch.Generator,
                  progress: Progress | None) -> VectorFit:  # fmt: skip
        assert job.clean is not None
        v, iterations, history, extra = self.run(
            job.model, job.x, job.clean, eps, generator, job.batch_size, progress
        )
        return VectorFit(v.to(job.device), eps, iterations, history, extra)

    def _restrict(self, job: Job, raw: VectorFit, eps: float) -> UniversalResult:
        v = raw.v if eps == raw.eps else raw.v * (eps / raw.eps)
        v = self.project(v, eps)
        assert lp_norm(v, self.settings.norm) <= eps * (1 + 1e-5)
        return UniversalResult(v.detach(), float("nan"), 0.0, raw.iterations, list(raw.history),
                               dict(raw.extra), budget=eps)  # fmt: skip

    def _finish(self, job: Job, result: UniversalResult) -> None:
        assert job.clean is not None
        result.fooling_rate_fit = self.success_rate(job.model, job.x, result.v, job.clean,
                                                    job.batch_size)  # fmt: skip

    # helpers for subclasses ---------------------------------------------------------------
    def project(self, v: Tensor, eps: float) -> Tensor:
        """Onto the budget ball and inside [-1, 1] (no pixel moves by more than the box width)."""
        return self.distance.project(v.clamp(-1.0, 1.0).unsqueeze(0), eps).squeeze(0)

    def success_rate(self, model: nn.Module, x: Tensor, v: Tensor, clean: Tensor,
                     batch_size: int) -> float:  # fmt: skip
        """Fooling rate of v on x (targeted success rate with a target); over every rank's
        shard of the fit set in a distributed fit."""
        return fooling_rate(model, x, v, clean, batch_size, self.target, self.dist)

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> tuple[Tensor, int, list[float], dict[str, Any]]:
        """Return (v, iterations, fit fooling-rate history, extra report fields) at budget eps."""


class PerSampleAttack(Attack[PerSampleResult]):
    """One adversarial input per sample within budget eps; subclasses implement `run` and
    inherit one of the budget bases."""

    kind = "per-sample"
    settings_type = PerSampleSettings
    budget_name = "eps"
    # each rank attacks its shard; random starts come from the same seed on every rank, so a
    # random-start attack draws differently from one process (deterministic ones agree)
    supports_distributed = True

    def _gathered(self, result: PerSampleResult, n: int) -> PerSampleResult:
        if self.dist is None or self.dist.world_size == 1:
            return result
        result.x_adv = gather_shards(result.x_adv, n, self.dist)
        result.sizes = gather_shards(result.sizes.to(result.x_adv.device), n, self.dist)
        return result

    @classmethod
    def default_budgets(cls, norm: str) -> list[float]:
        return list(DEFAULT_EPS[parse_norm(norm)])

    def _prepare(self, model: nn.Module, x: Tensor, labels: Tensor | None, batch_size: int) -> Job:
        if labels is None or len(labels) != len(x):
            raise UsageError(f"{self.name} needs one label per input", "pass labels of shape (N,)")
        return Job(model, x, labels, None, batch_size, model_device(model))

    def _generate(self, job: Job, eps: float, generator: torch.Generator,
                  progress: Progress | None) -> list[BatchAttempt]:  # fmt: skip
        assert job.labels is not None
        starts = range(0, len(job.x), job.batch_size)
        iterator = (
            progress.track(starts, len(starts), f"{self.name} eps={eps:.4g}") if progress else starts
        )
        attempts = []
        for i in iterator:
            xb = job.x[i : i + job.batch_size].to(job.device)
            yb = job.labels[i : i + job.batch_size].to(job.device)
            x_adv, size = self.run(job.model, xb, yb, eps, generator)
            attempts.append(BatchAttempt(xb, x_adv.detach(), size))
        return attempts

    def _restrict(self, job: Job, raw: list[BatchAttempt], eps: float) -> PerSampleResult:
        pairs = [self.restrict(a.x, a.x_adv, eps, a.size) for a in raw]
        x_adv = torch.cat([p[0] for p in pairs]) if pairs else job.x[:0]
        sizes = torch.cat([p[1] for p in pairs]) if pairs else torch.empty(0)
        return PerSampleResult(x_adv, sizes, 0.0, {}, budget=eps)

    def restrict(
        self, x: Tensor, x_adv: Tensor, eps: float, size: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Clip to the box and project onto the eps ball (minimal-norm attacks may overshoot)."""
        delta = self.distance.project(x_adv.clamp(0.0, 1.0) - x, eps)
        x_adv = apply_perturbation(x, delta)
        return x_adv, self.distance.norms(x_adv - x)

    @abstractmethod
    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """Return (x_adv, per-sample size or None to measure it in the lp norm)."""


ATTACKS: Registry[type[Attack[Any]]] = Registry("attack method")


def register_attacks(*classes: type[Attack[Any]]) -> None:
    """Add attack classes to `ATTACKS` under their own ``name`` and ``summary`` (in order: the
    order of ``--method`` choices and help texts)."""
    for cls in classes:
        ATTACKS.add(cls.name, cls, cls.summary)
