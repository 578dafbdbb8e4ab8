"""Device selection shared by every subcommand."""

from __future__ import annotations

import torch

from odekit.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda[:i]`` to a ``torch.device``; ``auto`` picks CUDA when present."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"device '{name}' was requested but CUDA is not available",
                "use --device cpu or --device auto",
            )
        return torch.device(name)
    raise UsageError(f"unknown device '{name}'", f"choose one of {', '.join(DEVICE_CHOICES)}")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every command and API call starts so)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _physical_cores() -> int:
    """Physical cores usable by this process (hyper-threads share a core's FPUs)."""
    import os

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            physical = core = ""
            for line in handle:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                elif not key and core:
                    cores.add((physical, core))
                    physical = core = ""
            if core:
                cores.add((physical, core))
    except OSError:
        pass
    return max(1, min(usable, len(cores) or usable))


def default_threads() -> int:
    """Physical cores, capped by ``OMP_NUM_THREADS`` when that is set to a positive integer."""
    import os

    threads = _physical_cores()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        threads = min(threads, int(env))
    return threads


MAX_THREADS = 1024


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (``None``: `default_threads`); returns the value used."""
    if threads is None:
        threads = default_threads()
    if not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}", "pass e.g. --threads 2")
    torch.set_num_threads(threads)
    return threads
