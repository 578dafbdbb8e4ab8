"""Training loops for neural ODEs: classifiers (ODENet) and CNF density estimation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import UsageError
from odekit.io.checkpoints import ModelMeta
from odekit.io.datasets import Dataset
from odekit.io.toy2d import ToyData
from odekit.methods.ode_train.evaluate import evaluate_classifier, evaluate_cnf
from odekit.methods.ode_train.loop import (
    ODETrainResult,
    ODETrainSettings,
    StopRule,
    TrainLoop,
    augment_images,
    shuffled_batches,
)
from odekit.methods.ode_train.regimes import RegimeSettings
from odekit.models.ode_models import CNF
from odekit.ode import SolverConfig
from odekit.progress import Progress


def train_ode_classifier(
    model: nn.Module,
    data: Dataset,
    settings: ODETrainSettings,
    regime: RegimeSettings,
    device: torch.device,
    *,
    progress: Progress | None = None,
    stop_when: StopRule | None = None,
    dist: Distributed | None = None,
) -> ODETrainResult:
    """Train an ODENet in place with cross-entropy; evaluates on the test split every epoch.

    ``stop_when(record)`` ends training early (benchmarks: time to a target accuracy).
    ``dist`` (several ranks): data parallel; every rank draws the same seeded batch, takes its
    shard of it, and the gradients are summed with weights (those of the whole batch), so the
    run follows the single-process one up to floating-point summation order.
    """
    if dist is not None and settings.batch_size < dist.world_size:
        raise UsageError(
            f"`batch_size` {settings.batch_size} cannot be split over {dist.world_size} ranks",
            f"use `batch_size` >= {dist.world_size}",
        )
    model.to(device)
    n = len(data.train)
    per_epoch = data.train.num_batches(settings.batch_size)
    total = settings.total_steps(per_epoch, default_epochs=10)
    loop = TrainLoop(model, settings, regime, total, progress, dist)
    generator = torch.Generator().manual_seed(settings.seed)
    test = data.test.subset(settings.eval_samples, settings.seed)
    batches = shuffled_batches(n, settings.batch_size, generator)
    steps_done, stopped = 0, False
    for step in loop.progress.track(range(1, total + 1), total, "train-ode"):
        _, idx, last = next(batches)
        x = data.train.x[idx]
        if settings.augment and x.ndim == 4:
            x = augment_images(x, generator)  # before sharding: the generator stays in step
        y, share = data.train.y[idx], 1.0
        if dist is not None and dist.world_size > 1:
            part = dist.shard(len(idx))
            x, y, share = x[part.start : part.stop], y[part.start : part.stop], len(part) / len(idx)
        x, y = x.to(device), y.to(device)

        def loss_fn(x: Tensor = x, y: Tensor = y) -> Tensor:
            return F.cross_entropy(model(x), y)

        loop.step(loss_fn, step, share)
        steps_done = step
        if last or step == total:
            rec = loop.record(step, step / per_epoch, evaluate_classifier(model, test, device, dist=dist))
            if stop_when is not None and stop_when(rec):
                stopped = True
                break
    final = dict(loop.history[-1]) if loop.history else {}
    keep = ("test_accuracy", "test_loss", "train_loss")
    return loop.finish(steps_done, {k: final[k] for k in keep if k in final}, stopped)


def train_cnf(
    model: CNF,
    data: ToyData,
    settings: ODETrainSettings,
    regime: RegimeSettings,
    device: torch.device,
    *,
    progress: Progress | None = None,
    stop_when: StopRule | None = None,
) -> ODETrainResult:
    """Maximum-likelihood training of a CNF; test NLL before training and every ``eval_every``."""
    model.to(device)
    n = int(data.train.shape[0])
    per_epoch = (n + settings.batch_size - 1) // settings.batch_size
    if settings.iters is None and settings.epochs is None:
        total = 1000
    else:
        total = settings.total_steps(per_epoch, default_epochs=1)
    every = settings.eval_every or max(1, total // 10)
    loop = TrainLoop(model, settings, regime, total, progress)
    generator = torch.Generator().manual_seed(settings.seed)
    test = data.test[: settings.eval_samples] if settings.eval_samples else data.test
    batches = shuffled_batches(n, settings.batch_size, generator)
    loop.record(0, 0.0, evaluate_cnf(model, test, device))
    steps_done, stopped = 0, False
    for step in loop.progress.track(range(1, total + 1), total, "train-ode"):
        _, idx, _ = next(batches)
        x = data.train[idx].to(device)

        def nll(x: Tensor = x) -> Tensor:
            return -model.log_prob(x).mean()

        loop.step(nll, step)
        steps_done = step
        if step % every == 0 or step == total:
            rec = loop.record(step, step / per_epoch, evaluate_cnf(model, test, device))
            if stop_when is not None and stop_when(rec):
                stopped = True
                break
    final = loop.history[-1]
    metrics = {k: final[k] for k in ("test_nll", "bits_per_dim", "train_loss")}
    metrics["initial_test_nll"] = loop.history[0]["test_nll"]
    return loop.finish(steps_done, metrics, stopped)


def ode_checkpoint_meta(
    arch: str,
    args: dict[str, Any],
    *,
    num_classes: int | None,
    input_shape: list[int],
    normalization: dict[str, list[float]] | None,
    dataset: dict[str, Any],
    config: SolverConfig,
    regime: RegimeSettings,
    result: ODETrainResult,
    task: str,
    previous: ModelMeta | None = None,
    source_sha256: str | None = None,
) -> ModelMeta:
    """Checkpoint metadata: the builder args carry the training solver; extra says it plainly."""
    step = {
        "command": "train-ode",
        "task": task,
        "solver": config.to_dict(),
        "regime": regime.to_dict(),
        "iterations": result.iterations,
        "final_metrics": result.final_metrics,
    }
    return ModelMeta(
        arch=arch,
        args=args,
        num_classes=num_classes,
        input_shape=input_shape,
        normalization=normalization,
        dataset=dataset,
        history=[*(previous.history if previous else []), step],
        source_sha256=source_sha256,
        extra={
            "task": task,
            "training_solver": config.to_dict(),
            "training_nfe_per_solve": config.nfe_per_solve(),
            "training_regime": regime.to_dict(),
            **result.final_metrics,
        },
    )
