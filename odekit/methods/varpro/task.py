"""A supervised task for separable training: data, loss, metrics and the work-unit meter."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SeparableTask:
    """Training/test inputs and targets: float (n, t) for "ls", integer labels for "ce"."""

    loss: str
    x_train: Tensor
    c_train: Tensor
    x_test: Tensor
    c_test: Tensor
    num_outputs: int

    @property
    def n(self) -> int:
        return int(self.x_train.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype) -> SeparableTask:
        def cast(c: Tensor) -> Tensor:
            return c.to(device=device, dtype=dtype) if self.loss == "ls" else c.to(device)

        return SeparableTask(self.loss, self.x_train.to(device=device, dtype=dtype), cast(self.c_train),
                             self.x_test.to(device=device, dtype=dtype), cast(self.c_test), self.num_outputs)  # fmt: skip

    def data_loss(self, out: Tensor, c: Tensor) -> Tensor:
        """Mean loss per sample: ||x - c||^2 / 2 or cross-entropy."""
        if self.loss == "ls":
            return 0.5 * ((out - c) ** 2).sum() / out.shape[0]
        return F.cross_entropy(out, c)

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """One shuffled epoch of index batches."""
        order = torch.randperm(self.n, generator=generator)
        for start in range(0, self.n, batch_size):
            yield order[start : start + batch_size]

    @torch.no_grad()
    def metrics(self, model: nn.Module, batch_size: int = 2048) -> dict[str, float]:
        """train_loss and test_loss (data terms); train/test_rel_error (ls) or test_accuracy (ce)."""
        model.eval()
        out: dict[str, float] = {}
        for split, x, c in (("train", self.x_train, self.c_train), ("test", self.x_test, self.c_test)):
            pred = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
            out[f"{split}_loss"] = float(self.data_loss(pred, c))
            if self.loss == "ls":
                out[f"{split}_rel_error"] = float((pred - c).norm() / c.norm().clamp_min(1e-300))
            elif split == "test":
                out["test_accuracy"] = float((pred.argmax(1) == c).float().mean())
        return out


@dataclass
class Meter:
    """Work units (network passes over the training set: forward 1, backward 1) and time."""

    units: float = 0.0
    scale: float = 1.0  # cost of one pass relative to the final network (multilevel)
    started: float = field(default_factory=time.perf_counter)
    paused: float = 0.0

    def add(self, passes: float) -> None:
        self.units += passes * self.scale

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused

    def pause(self) -> _Pause:
        return _Pause(self)


class _Pause:
    """Evaluation time is not training time."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.meter.paused += time.perf_counter() - self.t0
