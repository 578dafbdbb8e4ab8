"""Numerical guards on what odekit writes: no model or vector with NaN or inf leaves a run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from odekit.errors import NumericalError


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], stage: str) -> None:
    """Raise `NumericalError` naming ``stage`` and the tensor if any value is NaN or infinite."""
    for name, tensor in tensors:
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise NumericalError(
                f"{stage}: tensor '{name}' holds {bad} NaN or infinite value(s) of {tensor.numel()}",
                "the computation diverged; try a smaller learning rate or step, a larger ridge, "
                "or check the inputs for extreme values (nothing was written)",
            )


def check_staged_tensors(folder: Path, command: str) -> None:
    """Check every safetensors file of a staged output set (models, perturbation vectors)."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            require_finite(((k, handle.get_tensor(k)) for k in keys), f"{command}: output '{path.name}'")
