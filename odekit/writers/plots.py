"""Matplotlib figures written atomically (Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from odekit.writers.atomic import atomic_write_bytes


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def save_figure(fig: Any, path: str | Path, force: bool = False, dpi: int = 120) -> Path:
    """Render to PNG in memory, then write atomically, then free the figure."""
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue(), force)
