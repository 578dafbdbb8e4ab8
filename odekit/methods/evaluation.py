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
    return statistics.median([_timed_ms(model, example, device) for _ in range(repeats)])


def _timed_ms(model: nn.Module, example: torch.Tensor, device: torch.device) -> float:
    """Wall-clock milliseconds of one forward pass, waiting for the device to finish."""
    start = time.perf_counter()
    model(example)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


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


@torch.no_grad()
def agreement(
    teacher: nn.Module,
    student: nn.Module,
    split: Split,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dist: Distributed | None = None,
) -> dict[str, float]:
    """Fraction of equal top-1 predictions and mean KL(teacher || student) in nats over ``split``.
    ``dist``: each rank compares its shard; the sums are all-reduced."""
    teacher.to(device).eval()
    student.to(device).eval()
    equal, kl_sum, n = 0, 0.0, 0
    part = dist.shard(len(split)) if dist is not None else range(len(split))
    for start in range(part.start, part.stop, batch_size):
        x = split.x[start : min(start + batch_size, part.stop)].to(device)
        log_p = torch.log_softmax(teacher(x).double(), dim=1)
        log_q = torch.log_softmax(student(x).double(), dim=1)
        equal += int((log_p.argmax(1) == log_q.argmax(1)).sum())
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        n += x.shape[0]
    if dist is not None and dist.world_size > 1:
        equal_sum, kl_sum, n_sum = dist.sum_numbers(equal, kl_sum, n)
        equal, n = int(equal_sum), int(n_sum)
    if n == 0:
        return {"agreement": float("nan"), "mean_kl": float("nan"), "samples": 0}
    return {"agreement": equal / n, "mean_kl": kl_sum / n, "samples": n}


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q3 - q1


@dataclass(frozen=True)
class LatencyComparison:
    """Teacher and student timed interleaved on the same batch: medians and interquartile ranges."""

    batch_size: int
    repeats: int
    teacher_ms: list[float]
    student_ms: list[float]

    @property
    def speedup(self) -> float:
        """Median teacher time over median student time."""
        return statistics.median(self.teacher_ms) / max(statistics.median(self.student_ms), 1e-12)

    def _entry(self, times: list[float]) -> dict[str, float]:
        median, iqr = _quartiles(times)
        b = self.batch_size
        return {
            f"median_ms_per_batch_of_{b}": median,
            f"iqr_ms_per_batch_of_{b}": iqr,
            "median_ms_per_sample": median / b,
            "iqr_ms_per_sample": iqr / b,
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "method": "teacher and student alternated (A/B, then B/A) on one batch after warm-up",
            "teacher": self._entry(self.teacher_ms),
            "student": self._entry(self.student_ms),
            "speedup": self.speedup,
        }


@torch.no_grad()
def compare_latency(
    teacher: nn.Module,
    student: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 30,
) -> LatencyComparison:
    """Time teacher and student alternately so load changes on a shared machine hit both alike."""
    teacher.to(device).eval()
    student.to(device).eval()
    example = example.to(device)
    for _ in range(warmup):
        teacher(example)
        student(example)
    synchronize(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    models = (teacher, student)
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[which].append(_timed_ms(models[which], example, device))
    return LatencyComparison(int(example.shape[0]), repeats, times[0], times[1])
