"""Shared measurements: accuracy, predictions, latency and model cost."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from odekit.device import synchronize
from odekit.distributed import Distributed
from odekit.io.datasets import Split
from odekit.models.layers import total_flops


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | str = "cpu") -> torch.Tensor:
    """Predicted class of every row of ``x`` (returned on the CPU)."""
    model.eval()
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(
    model: nn.Module,
    split: Split,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dist: Distributed | None = None,
) -> float:
    """Top-1 accuracy in [0, 1]. ``dist``: each rank predicts its shard, counts are summed."""
    if len(split) == 0:
        return float("nan")
    if dist is not None and dist.world_size > 1:
        part = dist.shard(len(split))
        hits = predict(model, split.x[part.start : part.stop], batch_size, device) == split.y[part.start : part.stop]
        correct, total = dist.sum_numbers(float(hits.sum()), float(hits.numel()))
        return correct / total
    hits = predict(model, split.x, batch_size, device) == split.y
    return float(hits.sum()) / hits.numel()


@torch.no_grad()
def measure_latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    warmup: int = 5,
    repeats: int = 30,
) -> float:
    """Median wall-clock milliseconds of one forward pass on ``example`` after warm-up."""
    model.eval()
    example = example.to(device)
    for _ in range(warmup):
        model(example)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class ModelCost:
    params: int
    flops: int
    storage_mb: float

    def to_dict(self) -> dict[str, float | int]:
        return {"params": self.params, "flops": self.flops, "storage_mb": round(self.storage_mb, 4)}


def model_cost(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> ModelCost:
    """Parameters, FLOPs per sample (2 x MACs) and float32 storage of parameters and buffers."""
    params = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return ModelCost(params, total_flops(model, input_shape), stored / 2**20)
