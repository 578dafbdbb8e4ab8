"""Supervised training and fine-tuning loops shared by the zoo script, reduce and asnet.

Fine-tuning can distil from a teacher: loss = beta * KL(teacher || student) + (1 - beta) * CE(labels),
as thesis ch. 6 uses for ASNet (beta = 0.1). A validation split held out from the training data
(never the test split) is evaluated before the first epoch and after each; the model returned is
the best one on it, the untrained starting point included (docs/finetuning.md).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError
from odekit.io.datasets import Dataset, Split
from odekit.methods.batchnorm import recalibrate_batchnorm
from odekit.methods.evaluation import accuracy, agreement
from odekit.progress import Progress, silent_if_none


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    beta: float = 0.0  # distillation weight when a teacher is given
    temperature: float = 1.0
    seed: int = 0
    warmup: float = 0.0  # fraction of the steps over which the learning rate ramps up linearly
    val_fraction: float = 0.1  # training samples held out for validation; 0: none (keep the last epoch)
    patience: int | None = None  # stop after this many epochs without a better validation score
    recalibrate_bn: bool = True  # re-estimate the given BatchNorms' statistics before the first evaluation

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise UsageError(f"`finetune` must be >= 0 epochs, got {self.epochs}", "use 0 to skip fine-tuning")
        if not self.lr > 0:
            raise UsageError(f"`lr` must be positive, got {self.lr}", "try 1e-3")
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` must be >= 1, got {self.batch_size}", "try 128")
        if not 0.0 <= self.beta <= 1.0:
            raise UsageError(f"`beta` (the distillation weight) must lie in [0, 1], got {self.beta}", "the thesis uses 0.1")
        if self.optimizer not in ("adam", "sgd"):
            raise UsageError(f"unknown optimizer '{self.optimizer}'", "choose adam or sgd")
        if self.schedule not in ("cosine", "constant"):
            raise UsageError(f"unknown lr schedule '{self.schedule}'", "choose cosine or constant")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"`val_fraction` must lie in [0, 1), got {self.val_fraction}", "the default is 0.1")
        if not 0.0 <= self.warmup < 1.0:
            raise UsageError(f"the warm-up fraction must lie in [0, 1), got {self.warmup}", "try 0.1")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"`patience` must be >= 1 epoch, got {self.patience}", "omit it to run every epoch")
        if not self.temperature > 0:
            raise UsageError(f"the distillation temperature must be positive, got {self.temperature}", "try 1")


@dataclass
class TrainHistory:
    """One record per epoch (epoch 0: the starting point, evaluated before training), the epoch whose weights the model holds and why training stopped."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None  # None: no validation split, the model holds the last epoch
    validation_samples: int = 0
    recalibrated_bn: int = 0  # BatchNorm layers re-estimated before the first evaluation (and kept)
    recalibration: dict[str, Any] = field(default_factory=dict)  # validation scores before/after it
    stopped: str = "completed"  # "completed" | "patience" | "diverged"

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}

    @property
    def trained_epochs(self) -> int:
        return sum(1 for e in self.epochs if e["epoch"] > 0)

    @property
    def kept_untuned(self) -> bool:
        """Training ran but no epoch beat the starting point on validation."""
        return self.best_epoch == 0 and self.trained_epochs > 0

    def summary(self) -> str:
        """One line: which epoch the model holds and why."""
        if self.best_epoch is None:
            return f"{self.trained_epochs} epochs, no validation split: the last epoch is kept"
        stop = {"patience": ", stopped early (`patience`)", "diverged": ", stopped: the loss diverged"}.get(self.stopped, "")
        if self.kept_untuned:
            return ("fine-tuning did not improve validation accuracy/agreement: the untuned model is kept"
                    f" ({self.trained_epochs} epochs tried{stop})")
        return f"kept epoch {self.best_epoch} of {self.trained_epochs} (best on {self.validation_samples} validation samples{stop})"

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "validation_samples": self.validation_samples,
                "recalibrated_bn": self.recalibrated_bn, "recalibration": self.recalibration, "stopped": self.stopped, "kept_untuned": self.kept_untuned,
                "summary": self.summary()}  # fmt: skip


def holdout(split: Split, fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """(train, validation): ``round(fraction * n)`` samples of a seeded permutation held out
    (at least one when ``fraction`` > 0 and at least one sample remains for training)."""
    n = len(split)
    k = min(max(round(fraction * n), 1 if fraction > 0 else 0), max(n - 1, 0))
    if k == 0:
        return split, Split(split.x[:0], split.y[:0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep, held = order[: n - k], order[n - k :]
    return Split(split.x[keep], split.y[keep]), Split(split.x[held], split.y[held])


def _optimizer(
    model: nn.Module, settings: TrainSettings, lr_overrides: Mapping[nn.Module, float] | None = None
) -> torch.optim.Optimizer:
    """One parameter group at settings.lr, plus one per module of `lr_overrides`."""
    special: dict[int, float] = {}
    for module, lr in (lr_overrides or {}).items():
        if not lr > 0:
            raise UsageError(f"`head_lr` must be positive, got {lr}", "try 1e-5")
        special.update({id(p): lr for p in module.parameters()})
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in special], "lr": settings.lr}]
    for lr in dict.fromkeys(special.values()):
        groups.append({"params": [p for p in params if special.get(id(p)) == lr], "lr": lr})
    groups = [g for g in groups if g["params"]]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay, nesterov=True)
    return torch.optim.Adam(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """beta * KL(teacher || student) + (1 - beta) * cross-entropy; plain CE without a teacher."""
    hard = F.cross_entropy(logits, labels)
    if teacher_logits is None or beta == 0.0:
        return hard
    t = temperature
    soft = F.kl_div(
        F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), log_target=True, reduction="batchmean"
    ) * (t * t)
    return beta * soft + (1.0 - beta) * hard


class _Validation:
    """Scores on the held-out split: accuracy, and agreement with the teacher when there is one."""

    def __init__(self, model: nn.Module, split: Split, teacher: nn.Module | None, device: torch.device,
                 dist: Distributed | None) -> None:  # fmt: skip
        self.model, self.split, self.teacher, self.device, self.dist = model, split, teacher, device, dist

    def scores(self) -> dict[str, float]:
        if len(self.split) == 0:
            return {}
        out = {"val_accuracy": accuracy(self.model, self.split, device=self.device, dist=self.dist)}
        if self.teacher is not None:
            agree = agreement(self.teacher, self.model, self.split, device=self.device, dist=self.dist)
            out["val_agreement"], out["val_kl"] = agree["agreement"], agree["mean_kl"]
        return out

    @staticmethod
    def key(record: dict[str, float]) -> tuple[float, float, float]:
        """Higher is better: validation accuracy, then agreement, then -KL(teacher || model)
        (which separates models that small validation splits score alike)."""
        return record.get("val_accuracy", 0.0), record.get("val_agreement", 0.0), -record.get("val_kl", 0.0)


def _recalibrate(
    model: nn.Module, fit: Split, layers: list[nn.Module], judge: _Validation, device: torch.device
) -> dict[str, Any]:
    """Re-estimate ``layers``' statistics on the training part; undone when that lowers the
    validation score (then the model keeps the statistics it came with)."""
    before = judge.scores()
    saved = [copy.deepcopy(m.state_dict()) for m in layers]
    count = recalibrate_batchnorm(model, fit.x, device=device, layers=layers)
    after = judge.scores()
    kept = not before or judge.key(after) >= judge.key(before)
    if not kept:
        for module, state in zip(layers, saved, strict=True):
            module.load_state_dict(state)
    return {"layers": count, "kept": kept, "before": before, "after": after}


def train_classifier(
    model: nn.Module,
    data: Dataset,
    settings: TrainSettings,
    device: torch.device,
    *,
    teacher: nn.Module | None = None,
    after_step: Callable[[nn.Module, Callable[[torch.Tensor], float]], None] | None = None,
    progress: Progress | None = None,
    lr_overrides: Mapping[nn.Module, float] | None = None,
    dist: Distributed | None = None,
    bn_layers: Sequence[nn.Module] | None = None,
    grad_masks: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    keep_untuned: bool = True,
) -> TrainHistory:
    """Train ``model`` in place on ``data.train`` less a validation split; keep the best epoch.

    ``settings.val_fraction`` of the training samples (seeded) are held out; the model is scored
    on them before the first epoch and after each, and ends holding the best-scoring weights
    (validation accuracy, then agreement with ``teacher``), the starting point included; with
    ``settings.patience``, training stops after that many epochs without improvement. A loss that
    turns non-finite stops training and restores the best epoch (raises without a validation split).
    ``bn_layers``: BatchNorm layers whose inputs changed (e.g. after compression); with
    ``settings.recalibrate_bn`` their statistics are re-estimated on the training part first.
    ``grad_masks``: (parameter, 0/1 mask) pairs; masked entries (e.g. structural zeros) never move.
    ``keep_untuned=False``: only trained epochs compete (e.g. when training is what makes the
    model sparse).
    ``lr_overrides`` gives the parameters of some modules their own learning rate (the
    schedule scales every group alike). ``after_step(model, lr_of)`` runs after each optimizer
    step (e.g. an L1 proximal step); ``lr_of(parameter)`` is that parameter's current rate.
    ``dist`` (several ranks): data-parallel training (DistributedDataParallel); every rank draws
    the same seeded batch order and takes every world_size-th batch (the same number on each
    rank), gradients are averaged, losses and accuracies are reduced over the ranks.
    """
    progress = silent_if_none(progress)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    fit, val = holdout(data.train, settings.val_fraction, settings.seed)
    history = TrainHistory(validation_samples=len(val))
    judge = _Validation(model, val, teacher, device, dist)
    if settings.recalibrate_bn and bn_layers:
        history.recalibration = _recalibrate(model, fit, list(bn_layers), judge, device)
        history.recalibrated_bn = int(history.recalibration["layers"]) if history.recalibration["kept"] else 0
    best: tuple[tuple[float, float, float], int, dict[str, torch.Tensor]] | None = None
    model.eval()
    start = {"epoch": 0, **judge.scores(), "test_accuracy": accuracy(model, data.test, device=device, dist=dist)}
    history.epochs.append(start)
    if len(val) and (keep_untuned or settings.epochs == 0):
        best = (judge.key(start), 0, copy.deepcopy(model.state_dict()))
    loop = _Epochs(model, fit, settings, device, teacher, after_step, lr_overrides, dist, grad_masks) if settings.epochs else None
    for epoch in progress.track(range(1, settings.epochs + 1), settings.epochs, "training"):
        loss = loop.run(epoch) if loop is not None else None
        model.eval()
        if loss is None:
            if best is None:  # no validation split, or nothing trained to fall back on
                raise NumericalError(f"training diverged at epoch {epoch} (the loss is not finite)", "lower the learning rate")
            history.stopped = "diverged"
            break
        record = {"epoch": epoch, "loss": loss, **judge.scores(),
                  "test_accuracy": accuracy(model, data.test, device=device, dist=dist)}  # fmt: skip
        history.epochs.append(record)
        progress.update(loss=record["loss"], acc=record.get("val_accuracy", record["test_accuracy"]))
        if len(val) and (best is None or judge.key(record) > best[0]):
            best = (judge.key(record), epoch, copy.deepcopy(model.state_dict()))
        if best is not None and settings.patience is not None and epoch - best[1] >= settings.patience:
            history.stopped = "patience"
            break
    if best is not None:
        model.load_state_dict(best[2])
        history.best_epoch = best[1]
    model.eval()
    return history


def lr_factor(schedule: str, steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: a linear warm-up over the first ``warmup``
    fraction of the steps, then constant or a cosine decay to zero at ``steps``."""
    ramp = max(1, round(warmup * steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        up = min(1.0, (step + 1) / ramp) if ramp else 1.0
        if schedule == "constant":
            return up
        return up * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

    return factor


class _Epochs:
    """The optimizer, schedule and batch order of one training run; ``run`` trains one epoch."""

    def __init__(
        self,
        model: nn.Module,
        fit: Split,
        settings: TrainSettings,
        device: torch.device,
        teacher: nn.Module | None,
        after_step: Callable[[nn.Module, Callable[[torch.Tensor], float]], None] | None,
        lr_overrides: Mapping[nn.Module, float] | None,
        dist: Distributed | None,
        grad_masks: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
        self.model, self.fit, self.settings, self.device = model, fit, settings, device
        self.teacher, self.after_step, self.dist = teacher, after_step, dist
        self.masks = [(p, m.to(device=device, dtype=p.dtype)) for p, m in grad_masks or []]
        self.parallel = dist is not None and dist.world_size > 1
        self.net: nn.Module = model
        if self.parallel:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.world, self.rank = (dist.world_size, dist.rank) if dist is not None and self.parallel else (1, 0)
        self.optimizer = _optimizer(model, settings, lr_overrides)
        self.group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        self.per_epoch = fit.num_batches(settings.batch_size) // self.world
        if self.per_epoch == 0:
            raise UsageError(
                f"{fit.num_batches(settings.batch_size)} batches cannot feed {self.world} ranks",
                "use fewer ranks or a smaller `batch_size`",
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(settings.schedule, max(1, settings.epochs * self.per_epoch), settings.warmup)
        )
        self.generator = torch.Generator().manual_seed(settings.seed)

    def lr_of(self, param: torch.Tensor) -> float:
        return float(self.optimizer.param_groups[self.group_of.get(id(param), 0)]["lr"])

    def run(self, epoch: int) -> float | None:
        """One epoch; the mean training loss (over the ranks), or None when it turned non-finite."""
        settings, world = self.settings, self.world
        self.model.train()
        total, seen = 0.0, 0
        batches = self.fit.batches(settings.batch_size, self.device, shuffle=True, generator=self.generator)
        for x, y in itertools.islice(batches, self.rank, self.per_epoch * world, world):
            logits = self.net(x)
            teacher_logits = None
            if self.teacher is not None and settings.beta > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
            loss = distillation_loss(logits, y, teacher_logits, settings.beta, settings.temperature)
            if not torch.isfinite(loss):
                if self.parallel:  # every rank must take the same number of steps
                    raise NumericalError(f"training diverged at epoch {epoch} (loss is {loss.item()})", "lower the learning rate")
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for param, mask in self.masks:
                if param.grad is not None:
                    param.grad.mul_(mask)
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step(self.model, self.lr_of)
            self.scheduler.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        if self.parallel and self.dist is not None:
            total, seen_all = self.dist.sum_numbers(total, seen)
            seen = int(seen_all)
        return total / max(seen, 1)
