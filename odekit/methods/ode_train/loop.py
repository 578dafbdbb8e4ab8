"""The shared training loop: settings, result, optimizer and schedule, batches, bookkeeping."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError
from odekit.methods.ode_train.regimes import RegimeSettings, USampler
from odekit.models.ode_models import nfe_counts, ode_blocks, set_u
from odekit.progress import Progress, silent_if_none

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class ODETrainSettings:
    """Optimisation settings shared by both tasks; steps = iters, or epochs x batches."""

    epochs: int | None = None
    iters: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "constant"
    weight_decay: float = 0.0
    momentum: float = 0.9
    augment: bool = False
    eval_every: int | None = None
    eval_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "iters", "eval_every", "eval_samples"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise UsageError(f"`{name}` must be a positive integer, got {value}")
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"`lr` must be positive, got {self.lr}", "try 1e-3 with adam")
        if self.weight_decay < 0:
            raise UsageError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer '{self.optimizer}'", f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown `lr_schedule` '{self.schedule}'", f"choose one of {', '.join(SCHEDULES)}")

    def total_steps(self, batches_per_epoch: int, default_epochs: int) -> int:
        if self.iters is not None:
            return int(self.iters)
        return int(self.epochs or default_epochs) * batches_per_epoch


@dataclass(frozen=True)
class ODETrainResult:
    """Per-evaluation history and the run's averages (NFE and seconds per training iteration)."""

    history: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    nfe_forward: float = 0.0
    nfe_backward: float = 0.0
    seconds_per_iter: float = 0.0
    train_seconds: float = 0.0
    regime: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    interp_error: float | None = None  # irdm: largest interpolation error estimate of any solve
    interp_tol: float | None = None


def _optimizer(model: nn.Module, s: ODETrainSettings, total: int) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    elif s.schedule == "step":  # x0.1 at 50% and 75% of training, as the thesis' step schedules
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, total // 2), max(1, 3 * total // 4)], 0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def augment_images(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crops (zero padding of 1/8 of the side) and, for RGB images, horizontal flips."""
    n, c, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if c == 3:  # flipping digits changes their meaning; natural images keep it
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip.to(out.device)] = out[flip.to(out.device)].flip(-1)
    return out


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[tuple[int, Tensor, bool]]:
    """Endless shuffled index batches, reshuffled every epoch; yields (epoch, index, last_in_epoch)."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=generator)
        starts = list(range(0, n, batch_size))
        for j, start in enumerate(starts):
            yield epoch, order[start : start + batch_size], j == len(starts) - 1
        epoch += 1


def _check_loss(loss: Tensor, step: int) -> None:
    if not bool(torch.isfinite(loss)):
        raise NumericalError(
            f"training diverged at iteration {step} (loss is {loss.item()})",
            "lower `lr`, or use more `steps` / tighter `rtol`",
        )


StopRule = Callable[[dict[str, float]], bool]


class TrainLoop:
    """Shared bookkeeping: optimizer, regime draws, NFE/time averages, evaluation records."""

    def __init__(self, model: nn.Module, s: ODETrainSettings, regime: RegimeSettings, total: int,
                 progress: Progress | None, dist: Distributed | None = None) -> None:  # fmt: skip
        blocks = ode_blocks(model)
        if not blocks:
            raise UsageError("the model has no ODE block", "train-ode trains odenet4, odenet10 or cnf models")
        regime.check_solver(blocks[0].config)
        self.model, self.settings, self.total = model, s, total
        self.progress = silent_if_none(progress)
        self.optimizer, self.scheduler = _optimizer(model, s, total)
        self.sampler = USampler(regime)
        self.history: list[dict[str, float]] = []
        self.interp_error: float | None = None  # irdm: the worst estimate of any solve, and its tolerance
        self.interp_tol: float | None = None
        self.nfe_f = self.nfe_b = 0
        self.window: list[float] = []
        self.seconds = 0.0
        self.dist = dist if dist is not None and dist.world_size > 1 else None

    def step(self, loss_fn: Callable[[], Tensor], step: int, share: float = 1.0) -> float:
        """One optimizer step. ``share``: this rank's fraction of the global batch; with several
        ranks the gradients are weighted by it and summed, i.e. those of the whole batch."""
        u, ensemble = self.sampler.draw()
        set_u(self.model, u, ensemble)
        self.model.train()
        start = time.perf_counter()
        loss = loss_fn()
        _check_loss(loss, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist is not None:  # one all-reduce of every gradient, flattened
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            for g, summed in zip(grads, self.dist.all_reduce_sum_many([g * share for g in grads]), strict=True):
                g.copy_(summed)
        self.optimizer.step()
        self.scheduler.step()
        self.seconds += time.perf_counter() - start
        f, b = nfe_counts(self.model)
        self.nfe_f += f
        self.nfe_b += b
        self._track_interpolation()
        value = float(loss.detach())
        self.window.append(value)
        self.progress.update(loss=value, nfe_f=f, nfe_b=b)
        return value

    def _track_interpolation(self) -> None:
        """irdm: keep the worst interpolation-error estimate of the latest solves."""
        for block in ode_blocks(self.model):
            for st in getattr(block, "call_stats", None) or [block.last_stats]:
                if st.interp_error is not None and (self.interp_error is None
                                                    or st.interp_error > self.interp_error):
                    self.interp_error, self.interp_tol = st.interp_error, st.interp_tol

    def record(self, step: int, epoch: float, metrics: dict[str, float]) -> dict[str, float]:
        set_u(self.model, None, None)  # evaluate with the model's own (standalone) solver
        rec = {
            "iteration": step,
            "epoch": round(epoch, 4),
            "train_loss": float(np.mean(self.window)) if self.window else float("nan"),
            **metrics,
            "train_seconds": round(self.seconds, 4),
        }
        self.window = []
        self.history.append(rec)
        return rec

    def finish(self, steps_done: int, final: dict[str, float], stopped: bool) -> ODETrainResult:
        set_u(self.model, None, None)
        self.model.eval()
        return ODETrainResult(
            history=self.history, final_metrics=final, iterations=steps_done,
            nfe_forward=self.nfe_f / max(steps_done, 1), nfe_backward=self.nfe_b / max(steps_done, 1),
            seconds_per_iter=self.seconds / max(steps_done, 1), train_seconds=self.seconds,
            regime=self.sampler.summary(), stopped_early=stopped,
            interp_error=self.interp_error, interp_tol=self.interp_tol,
        )  # fmt: skip
