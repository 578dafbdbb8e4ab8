"""Supervised training and fine-tuning loops shared by the zoo script, reduce and asnet.

Fine-tuning can distil from a teacher: loss = beta * KL(teacher || student) + (1 - beta) * CE(labels),
as thesis ch. 6 uses for ASNet (beta = 0.1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError
from odekit.io.datasets import Dataset
from odekit.methods.evaluation import accuracy
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

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise UsageError(f"--finetune must be >= 0 epochs, got {self.epochs}", "use 0 to skip fine-tuning")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}", "try 1e-3")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}", "try 128")
        if not 0.0 <= self.beta <= 1.0:
            raise UsageError(f"--beta (the distillation weight) must lie in [0, 1], got {self.beta}", "the thesis uses 0.1")
        if self.optimizer not in ("adam", "sgd"):
            raise UsageError(f"unknown optimizer '{self.optimizer}'", "choose adam or sgd")
        if self.schedule not in ("cosine", "constant"):
            raise UsageError(f"unknown lr schedule '{self.schedule}'", "choose cosine or constant")


@dataclass
class TrainHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}


def _optimizer(
    model: nn.Module, settings: TrainSettings, lr_overrides: Mapping[nn.Module, float] | None = None
) -> torch.optim.Optimizer:
    """One parameter group at settings.lr, plus one per module of `lr_overrides`."""
    special: dict[int, float] = {}
    for module, lr in (lr_overrides or {}).items():
        if not lr > 0:
            raise UsageError(f"--head-lr must be positive, got {lr}", "try 1e-5")
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
) -> TrainHistory:
    """Train ``model`` in place on ``data.train``; test accuracy after every epoch.

    ``lr_overrides`` gives the parameters of some modules their own learning rate (the
    schedule scales every group alike). ``after_step(model, lr_of)`` runs after each optimizer
    step (e.g. an L1 proximal step); ``lr_of(parameter)`` is that parameter's current rate.
    ``dist`` (several ranks): data-parallel training (DistributedDataParallel); every rank draws
    the same seeded batch order and takes every world_size-th batch (the same number on each
    rank), gradients are averaged, losses and test accuracy are reduced over the ranks.
    """
    progress = silent_if_none(progress)
    model.to(device)
    parallel = dist is not None and dist.world_size > 1
    net: nn.Module = model
    if parallel:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    world, rank = (dist.world_size, dist.rank) if dist is not None and parallel else (1, 0)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = _optimizer(model, settings, lr_overrides)
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}

    def lr_of(param: torch.Tensor) -> float:
        return float(optimizer.param_groups[group_of.get(id(param), 0)]["lr"])

    per_epoch = data.train.num_batches(settings.batch_size) // world
    if per_epoch == 0:
        raise UsageError(
            f"{data.train.num_batches(settings.batch_size)} batches cannot feed {world} ranks",
            "use fewer ranks or a smaller --batch-size",
        )
    steps = max(1, settings.epochs * per_epoch)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        if settings.schedule == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    history = TrainHistory()
    for epoch in progress.track(range(settings.epochs), settings.epochs, "training"):
        model.train()
        total, seen = 0.0, 0
        batches = data.train.batches(settings.batch_size, device, shuffle=True, generator=generator)
        for x, y in itertools.islice(batches, rank, per_epoch * world, world):
            logits = net(x)
            teacher_logits = None
            if teacher is not None and settings.beta > 0:
                with torch.no_grad():
                    teacher_logits = teacher(x)
            loss = distillation_loss(logits, y, teacher_logits, settings.beta, settings.temperature)
            if not torch.isfinite(loss):
                raise NumericalError(
                    f"training diverged at epoch {epoch + 1} (loss is {loss.item()})", "lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model, lr_of)
            scheduler.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        model.eval()
        if parallel and dist is not None:
            total, seen_all = dist.sum_numbers(total, seen)
            seen = int(seen_all)
        test_acc = accuracy(model, data.test, device=device, dist=dist)
        record = {"epoch": epoch + 1, "loss": total / max(seen, 1), "test_accuracy": test_acc}
        history.epochs.append(record)
        progress.update(loss=record["loss"], acc=record["test_accuracy"])
    model.eval()
    return history
