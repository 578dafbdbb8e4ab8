"""Peak-memory estimates of `reduce`, checked before anything large is allocated (issue 26)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from odekit.errors import UsageError

GIB = 2**30


def available_bytes(device: torch.device) -> int | None:
    """Memory the run may still take: free CUDA memory, or the host's MemAvailable (Linux)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def check_memory(estimate: float, what: str, hint: str, device: torch.device) -> None:
    """Stop with one line when ``estimate`` bytes exceed the available memory."""
    free = available_bytes(device)
    if free is not None and estimate > free:
        raise UsageError(
            f"{what} needs about {estimate / GIB:.1f} GiB, only {free / GIB:.1f} GiB are available on {device}",
            hint,
        )


def region_bytes(
    dims: dict[int, int], ells: dict[int, int], in_dim: int, settings: Any, itemsize: int
) -> float:
    """Peak of the region mode: every state's frequent-directions buffer (2 ell x D) and basis,
    the first stage's rows of the input map (P x input size, float64), one batch of the region's
    activations (float32, teacher pass) and the dense maps between sampled states."""
    sketches = sum(3 * ells[k] * d * itemsize for k, d in dims.items())
    rows = max(ells.values(), default=0)
    first_map = 2 * rows * in_dim * 8
    batch = 4 * settings.batch_size * (sum(dims.values()) + in_dim)
    dense = 8 * rows * rows * max(len(dims), 1)
    return float(sketches + first_map + batch + dense)


@contextlib.contextmanager
def allocation_guard(what: str, hint: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into one user-facing line."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise UsageError(f"{what} ran out of memory ({type(exc).__name__})", hint) from exc
    except RuntimeError as exc:
        text = str(exc)
        if "allocate" not in text and "out of memory" not in text.lower():
            raise
        raise UsageError(f"{what} ran out of memory ({text.splitlines()[0][:120]})", hint) from exc
