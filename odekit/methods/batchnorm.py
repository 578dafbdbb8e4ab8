"""BatchNorm statistics re-estimated from training images (after a network's inputs changed).

A compressed network keeps its teacher's BatchNorm layers, but the activations reaching them
change; their running mean and variance must be measured again (a no-gradient pass), or a
student can sit at chance although its weights are fine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    layers: Iterable[nn.Module] | None = None,
) -> int:
    """Reset and re-estimate the running statistics of ``layers`` (default: every BatchNorm).

    The running mean becomes the exact mean over ``images`` whatever the batch size (each batch
    is weighted by its size), the running variance the size-weighted mean of the batch variances. Only the chosen BatchNorm layers see training mode; every
    other module, dropout included, stays as it was, and the model's modes are restored after.
    Returns the number of layers recalibrated.
    """
    chosen: list[Any] = list(layers) if layers is not None else batchnorm_layers(model)
    if not chosen or len(images) == 0:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in chosen}
    model.eval()
    for bn in chosen:
        bn.reset_running_stats()
        bn.train()
    try:
        seen = 0
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            seen += len(batch)
            for bn in chosen:  # running <- running + (n_b / n_seen) (batch - running)
                bn.momentum = len(batch) / seen
            model(batch.to(device))
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return len(chosen)
