"""Training separable networks: Adam/SGD (W jointly), slimtrain, GNvpro; multilevel; history.

Every optimizer reports a history of loss/metrics against work units (network passes over
the training set: one forward + one backward = 2 units) and wall time (evaluation excluded).
``levels = L > 1`` trains odenet_antisym at depth d, 2d, ..., 2^(L-1) d, prolongating the
weights by interpolation in t between levels; a pass of a shallower network counts
(its RK4 steps / the final steps) units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from odekit.errors import NumericalError, UnsupportedModelError, UsageError
from odekit.methods.varpro.diagnosis import diagnose
from odekit.methods.varpro.gnvpro import (
    TR_SOLVERS,
    GNvproRecord,
    ReducedPoint,
    TrustRegionSettings,
    gnvpro,
)
from odekit.methods.varpro.inner import InnerProblem, solve_inner
from odekit.methods.varpro.lbfgs import LbfgsRecord, reduced_lbfgs
from odekit.methods.varpro.separable import Separable
from odekit.methods.varpro.slimtrain import SampledMemory, sampled_tikhonov
from odekit.methods.varpro.task import Meter, SeparableTask
from odekit.models.antisym import ODENetAntisym, prolongate
from odekit.progress import Progress, silent_if_none
from odekit.registry import Registry

VARPRO_OPTIMIZERS: Registry[str] = Registry("optimizer")
VARPRO_OPTIMIZERS.add("adam", "adam", "Adam on theta and W jointly (mini-batches)")
VARPRO_OPTIMIZERS.add("sgd", "sgd", "SGD with momentum 0.9 on theta and W jointly (mini-batches)")
VARPRO_OPTIMIZERS.add("gnvpro", "gnvpro", "full-batch Gauss-Newton-Krylov trust region on theta, exact W(theta)")
VARPRO_OPTIMIZERS.add("slimtrain", "slimtrain", "mini-batch sampled-Tikhonov W (GCV) + Adam on theta (least squares)")
VARPRO_OPTIMIZERS.add("lbfgs", "lbfgs", "full-batch L-BFGS on theta, exact W(theta) (2 work units per evaluation)")


@dataclass(frozen=True)
class VarProSettings:
    """Validated settings; ``iters`` = GNvpro outer iterations, ``epochs`` = mini-batch passes."""

    optimizer: str = "gnvpro"
    loss: str = "ls"
    iters: int = 30
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-2
    alpha_theta: float = 1e-3
    alpha_w: float = 1e-3
    krylov_rank: int = 10
    radius: float | None = None  # None: 0.1 (steihaug) or the full Gauss-Newton step (gmres-subspace)
    tr_solver: str = "steihaug"
    levels: int = 1
    memory: int = 5
    max_work_units: float | None = None
    level_units: float | None = None  # work units per level, in passes of that level's network
    float64: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", VARPRO_OPTIMIZERS.entry(self.optimizer).name)
        if self.loss not in ("ls", "ce"):
            raise UsageError(f"unknown loss '{self.loss}'", "ls (regression) or ce (classification)")
        for name in ("iters", "epochs", "batch_size", "krylov_rank", "levels", "memory"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                what = "slimtrain's memory" if name == "memory" else f"`{name}`"  # memory has no flag
                raise UsageError(f"{what} must be a positive integer, got {value}")
        radius = 0.1 if self.radius is None else self.radius
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(radius) and radius > 0):
            raise UsageError(f"`lr` and `radius` must be positive, got {self.lr}, {self.radius}")
        if self.tr_solver not in TR_SOLVERS:
            raise UsageError(f"unknown `tr_solver` '{self.tr_solver}'", f"choose one of {', '.join(TR_SOLVERS)}")
        if not (self.alpha_theta >= 0 and self.alpha_w >= 0):
            raise UsageError(f"`regularization` values must be >= 0, got {self.alpha_theta}, {self.alpha_w}")
        if self.loss == "ce" and self.alpha_w == 0 and self.optimizer in ("gnvpro", "lbfgs"):
            raise UsageError("cross-entropy needs alpha_W > 0 for a unique W(theta)", "e.g. `regularization` 1e-4,1e-4")
        if self.optimizer == "slimtrain" and self.loss != "ls":
            raise UsageError("slimtrain's sampled Tikhonov W update is least squares", "use gnvpro or adam for `task` classify")
        if self.max_work_units is not None and not self.max_work_units > 0:
            raise UsageError(f"`work_units` must be positive, got {self.max_work_units}")
        if self.level_units is not None and not self.level_units > 0:
            raise UsageError(f"the work units per level must be positive, got {self.level_units}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VarProResult:
    optimizer: str
    history: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    work_units: float = 0.0
    train_seconds: float = 0.0
    levels: list[dict[str, Any]] = field(default_factory=list)
    diagnosis: dict[str, Any] | None = None  # GNvpro: predicted vs actual decrease of Phi


class _Run:
    """Shared bookkeeping of one optimizer run: meter, history, budget."""

    def __init__(self, task: SeparableTask, s: VarProSettings, result: VarProResult, meter: Meter, progress: Progress) -> None:
        self.task, self.s, self.result, self.meter, self.progress = task, s, result, meter, progress
        self.level_start = 0.0

    def spent(self) -> bool:
        """The whole budget (--work-units) is spent."""
        return self.s.max_work_units is not None and self.meter.units >= self.s.max_work_units

    def over_budget(self) -> bool:
        """The whole budget or this level's (``level_units`` passes of this level's network) is spent."""
        level = self.s.level_units
        return self.spent() or (level is not None and self.meter.units - self.level_start >= level * self.meter.scale - 1e-9)

    def record(self, model: nn.Module, level: int, iteration: int, **extra: float) -> dict[str, float]:
        with self.meter.pause():
            metrics = self.task.metrics(model)
        rec = {"level": level, "iteration": iteration, "work_units": round(self.meter.units, 6),
               "seconds": round(self.meter.seconds(), 4), **metrics, **extra}  # fmt: skip
        if not math.isfinite(metrics["train_loss"]):
            raise NumericalError(f"{self.s.optimizer} diverged (train loss {metrics['train_loss']})", "lower `lr` or `radius`")
        self.result.history.append(rec)
        return rec


def _penalty(params: Sequence[Tensor], alpha: float) -> Tensor | float:
    return 0.5 * alpha * sum((p * p).sum() for p in params) if alpha > 0 else 0.0


def _first_order(model: nn.Module, run: _Run, level: int) -> None:
    """Adam/SGD on all parameters, W included (the baseline the slides compare against)."""
    s, task, sep = run.s, run.task, Separable(model)
    head = list(sep.head.parameters())
    params = [*sep.theta, *head]
    opt: torch.optim.Optimizer = (torch.optim.SGD(params, lr=s.lr, momentum=0.9) if s.optimizer == "sgd"
                                  else torch.optim.Adam(params, lr=s.lr))  # fmt: skip
    gen = torch.Generator().manual_seed(s.seed + level)
    for epoch in run.progress.track(range(1, s.epochs + 1), s.epochs, s.optimizer):
        model.train()
        for idx in task.batches(s.batch_size, gen):
            loss = task.data_loss(model(task.x_train[idx]), task.c_train[idx])
            loss = loss + _penalty(sep.theta, s.alpha_theta) + _penalty(head, s.alpha_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.meter.add(2.0 * len(idx) / task.n)
        rec = run.record(model, level, epoch)
        run.progress.update(loss=rec["train_loss"])
        if run.over_budget():
            return


def _slimtrain(model: nn.Module, run: _Run, level: int) -> None:
    s, task, sep = run.s, run.task, Separable(model)
    opt = torch.optim.Adam(sep.theta, lr=s.lr)
    memory = SampledMemory(s.memory)
    W = sep.get_W().double()
    gen = torch.Generator().manual_seed(s.seed + level)
    lam = float("nan")
    for epoch in run.progress.track(range(1, s.epochs + 1), s.epochs, "slimtrain"):
        model.train()
        for idx in task.batches(s.batch_size, gen):
            feats = sep.features(task.x_train[idx])
            fa_mem, c_mem = memory.push(sep.augment(feats.detach().double()), task.c_train[idx].double())
            W, lam = sampled_tikhonov(fa_mem, c_mem, W)
            out = sep.augment(feats) @ W.T.to(feats.dtype)
            loss = task.data_loss(out, task.c_train[idx]) + _penalty(sep.theta, s.alpha_theta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.meter.add(2.0 * len(idx) / task.n)
        sep.set_W(W)
        rec = run.record(model, level, epoch, gcv_lambda=lam)
        run.progress.update(loss=rec["train_loss"])
        if run.over_budget():
            return


def _gnvpro(model: nn.Module, run: _Run, level: int) -> None:
    s, task = run.s, run.task
    sep = Separable(model)
    radius = s.radius if s.radius is not None or s.tr_solver == "gmres-subspace" else 0.1
    tr = TrustRegionSettings(max_iter=s.iters, krylov_rank=s.krylov_rank, radius=radius, solver=s.tr_solver)
    model.train()
    base = run.meter.units

    def callback(record: GNvproRecord, point: ReducedPoint) -> None:
        run.meter.units = base + record.work_units * run.meter.scale
        sep.set_W(point.W)
        run.record(model, level, record.iteration, radius=record.radius, grad_norm=record.grad_norm, krylov=record.krylov,
                   accepted=float(record.accepted), phi_before=record.phi + (record.actual if record.accepted else 0.0),
                   predicted_decrease=record.predicted, actual_decrease=record.actual,
                   ratio=record.actual / max(record.predicted, 1e-300), interior=float(record.interior))  # fmt: skip
        if run.over_budget():
            raise _Budget

    try:
        _, units = gnvpro(sep, task.x_train, task.c_train, task.loss, s.alpha_theta, s.alpha_w, tr, callback=callback)
        run.meter.units = base + units * run.meter.scale
    except _Budget:
        pass


def _lbfgs(model: nn.Module, run: _Run, level: int) -> None:
    s, task = run.s, run.task
    sep = Separable(model)
    model.train()
    base = run.meter.units

    def callback(record: LbfgsRecord, point: ReducedPoint) -> None:
        run.meter.units = base + record.work_units * run.meter.scale
        sep.set_W(point.W)
        run.record(model, level, record.iteration, grad_norm=record.grad_norm, evaluations=record.evaluations)
        if run.over_budget():
            raise _Budget

    try:
        _, units = reduced_lbfgs(sep, task.x_train, task.c_train, task.loss, s.alpha_theta, s.alpha_w, s.iters, callback=callback)
        run.meter.units = base + units * run.meter.scale
    except _Budget:
        pass


class _Budget(Exception):
    """The work-unit budget is spent (ends a GNvpro run between outer iterations)."""


TRAINERS = {"adam": _first_order, "sgd": _first_order, "slimtrain": _slimtrain, "gnvpro": _gnvpro, "lbfgs": _lbfgs}


def init_w(model: nn.Module, task: SeparableTask, alpha_w: float) -> None:
    """W(theta) at the initial theta (VarPro optimizers start from it)."""
    sep = Separable(model)
    with torch.no_grad():
        fa = sep.augment(sep.features(task.x_train).double())
    problem = InnerProblem(fa, task.c_train.double() if task.loss == "ls" else task.c_train, task.loss, max(alpha_w, 1e-10), sep.num_outputs)
    sep.set_W(solve_inner(problem).W)


def train_separable(
    model: nn.Module,
    task: SeparableTask,
    settings: VarProSettings,
    device: torch.device,
    *,
    progress: Progress | None = None,
) -> tuple[nn.Module, VarProResult]:
    """Train ``model`` (a new module when levels > 1); float64 training when ``settings.float64``."""
    progress = silent_if_none(progress)
    dtype = torch.float64 if settings.float64 else torch.float32
    if settings.optimizer in ("gnvpro", "lbfgs"):
        dtype = torch.float64  # GN products, trust-region ratios and line searches need double precision
    out_dtype = next(model.parameters()).dtype
    model = model.to(device=device, dtype=dtype)
    task = task.to(device, dtype)
    Separable(model, task.x_train[:4])  # fails early for a non-separable model
    if settings.levels > 1 and not isinstance(model, ODENetAntisym):
        raise UnsupportedModelError("`levels` > 1 prolongates an odenet_antisym in t", "use `model` odenet_antisym or `levels` 1")
    result = VarProResult(settings.optimizer)
    final_steps = None
    if isinstance(model, ODENetAntisym) and _follows_depth(model):
        final_steps = _steps(model) * 2 ** (settings.levels - 1)
    meter = Meter()
    run = _Run(task, settings, result, meter, progress)
    for level in range(settings.levels):
        if final_steps is not None and isinstance(model, ODENetAntisym):
            meter.scale = _steps(model) / final_steps
        if settings.optimizer in ("gnvpro", "slimtrain", "lbfgs"):
            init_w(model, task, settings.alpha_w)
            if level == 0:
                meter.add(1.0)  # the forward pass of W(theta0) (later levels: inside the trainer's first pass)
        if level == 0:
            run.record(model, level, 0)
        run.level_start = meter.units
        TRAINERS[settings.optimizer](model, run, level)
        if level < settings.levels - 1 and not run.spent():
            assert isinstance(model, ODENetAntisym)
            model, change = _prolongate(model, task)
            result.levels.append({"level": level + 1, "depth": model.depth, "steps": _steps(model), "output_change": change})
    result.work_units = round(meter.units, 6)  # batch fractions add up with float round-off
    result.train_seconds = meter.seconds()
    last = result.history[-1]
    result.final_metrics = {k: v for k, v in last.items() if k.startswith(("test_", "train_"))} | {"work_units": result.work_units}
    if settings.optimizer == "gnvpro":
        result.diagnosis = diagnose(result.history).to_dict()
    return model.to(dtype=out_dtype).eval(), result


def _steps(model: ODENetAntisym) -> int:
    return int(model.ode.config.steps or model.depth)


def _follows_depth(model: ODENetAntisym) -> bool:
    return _steps(model) == model.depth


@torch.no_grad()
def _prolongate(model: ODENetAntisym, task: SeparableTask) -> tuple[ODENetAntisym, float]:
    """Double the depth; the RK4 steps double too when they followed the depth (max output change)."""
    fine = prolongate(model, refine_steps=_follows_depth(model))
    x = task.x_train[:512]
    return fine, float((fine(x) - model(x)).abs().max())


def fold_target_scaling(model: nn.Module, mean: list[float], std: list[float]) -> None:
    """Make a model trained on standardised targets output original units (the head is linear)."""
    head = Separable(model).head
    if head.bias is None and any(m != 0 for m in mean):
        raise UnsupportedModelError("the model's last linear layer has no bias to carry the target mean",
                                    "regression with VarPro needs nn.Linear(..., bias=True) as the last layer")  # fmt: skip
    with torch.no_grad():
        s = torch.tensor(std, dtype=head.weight.dtype, device=head.weight.device)
        m = torch.tensor(mean, dtype=head.weight.dtype, device=head.weight.device)
        head.weight.mul_(s[:, None])
        if head.bias is not None:
            head.bias.mul_(s).add_(m)
