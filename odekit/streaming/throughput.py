"""Achieved throughput of a streaming stage, next to the device's measured matmul peak.

A stage (e.g. streaming a teacher's activations into sketches) reports samples/s, model
GFLOP/s (FLOPs per sample from `odekit.models.layers`, 2 x multiply-adds) and the fraction of
the peak that a large dense matmul reaches on the same device in this process, so a user sees
how far the run is from the hardware limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from odekit.device import synchronize
from odekit.errors import UsageError

__all__ = ["StageThroughput", "ThroughputMeter", "measure_matmul_peak"]

_PEAK_CACHE: dict[tuple[str, torch.dtype, int], float] = {}


def measure_matmul_peak(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int = 3,
) -> float:
    """GFLOP/s of an n x n x n matmul on ``device`` (best of ``repeats`` after a warm-up).

    ``size`` defaults to 4096 on CUDA and 512 on CPU (large enough to be compute-bound, small
    enough to take well under a second). Cached per device, dtype, size and thread count."""
    device = torch.device(device)
    n = size or (4096 if device.type == "cuda" else 512)
    if n < 1 or repeats < 1:
        raise UsageError("matmul peak needs a positive size and repeat count")
    key = (f"{device}/{torch.get_num_threads()}", dtype, n)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    peak = 2.0 * n**3 / max(best, 1e-12) / 1e9
    _PEAK_CACHE[key] = peak
    return peak


@dataclass(frozen=True)
class StageThroughput:
    """One stage's achieved rate; ``fraction_of_peak`` is None when no peak was measured."""

    stage: str
    samples: int
    seconds: float
    flops_per_sample: float
    peak_gflops: float | None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def gflops(self) -> float:
        return self.samples_per_s * self.flops_per_sample / 1e9

    @property
    def fraction_of_peak(self) -> float | None:
        if not self.peak_gflops:
            return None
        return self.gflops / self.peak_gflops

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "stage": self.stage,
            "samples": self.samples,
            "seconds": self.seconds,
            "samples_per_s": self.samples_per_s,
            "model_gflops_per_s": self.gflops,
            "matmul_peak_gflops_per_s": self.peak_gflops,
            "fraction_of_peak": self.fraction_of_peak,
        }


class ThroughputMeter:
    """Times a stage on ``device`` (synchronising CUDA at both ends, never per batch).

    ``with meter: ... meter.add(batch_size)`` (or ``meter.start()`` ... ``meter.stop()``),
    then ``meter.result(flops_per_sample)``."""

    def __init__(self, stage: str, device: torch.device | str = "cpu") -> None:
        self.stage = stage
        self.device = torch.device(device)
        self.samples = 0
        self.seconds = 0.0
        self._start: float | None = None

    def __enter__(self) -> ThroughputMeter:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
        self._start = None

    def start(self) -> ThroughputMeter:
        return self.__enter__()

    def stop(self) -> ThroughputMeter:
        self.__exit__()
        return self

    def add(self, samples: int) -> None:
        self.samples += int(samples)

    def result(self, flops_per_sample: float, peak_gflops: float | None = None) -> StageThroughput:
        return StageThroughput(self.stage, self.samples, self.seconds, flops_per_sample, peak_gflops)
