"""Test metrics of ODE classifiers and CNFs, and the CNF's density on a grid (for its plot)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError
from odekit.io.datasets import Split
from odekit.models.ode_models import CNF, nfe_counts


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, split: Split, device: torch.device, batch_size: int = 512, dist: Distributed | None = None
) -> dict[str, float]:
    """Test accuracy, cross-entropy and forward NFE per batch with the blocks' current solver.
    ``dist``: each rank evaluates its shard of ``split``; the sums are all-reduced."""
    model.eval()
    if dist is not None and dist.world_size > 1:
        part = dist.shard(len(split))
        shard = Split(split.x[part.start : part.stop], split.y[part.start : part.stop])
        local = evaluate_classifier(model, shard, device, batch_size)
        n_local, n_batches = len(shard), shard.num_batches(batch_size)
        correct, loss, nfe, batches = dist.sum_numbers(
            local["test_accuracy"] * n_local, local["test_loss"] * n_local,
            local["nfe_per_forward"] * n_batches, n_batches,
        )  # fmt: skip
        n = max(len(split), 1)
        return {"test_accuracy": correct / n, "test_loss": loss / n, "nfe_per_forward": nfe / max(batches, 1)}
    correct, loss, nfe, batches = 0, 0.0, 0, 0
    for x, y in split.batches(batch_size, device):
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        nfe += nfe_counts(model)[0]
        batches += 1
    n = max(len(split), 1)
    return {"test_accuracy": correct / n, "test_loss": loss / n, "nfe_per_forward": nfe / max(batches, 1)}


@torch.no_grad()
def evaluate_cnf(model: CNF, x: Tensor, device: torch.device, batch_size: int = 1000) -> dict[str, float]:
    """Test negative log-likelihood (nats per sample) and bits/dim."""
    model.eval()
    total, nfe, batches = 0.0, 0, 0
    for start in range(0, len(x), batch_size):
        log_p = model.log_prob(x[start : start + batch_size].to(device))
        total += float(-log_p.sum())
        nfe += nfe_counts(model)[0]
        batches += 1
    nll = total / max(len(x), 1)
    if not math.isfinite(nll):
        raise NumericalError("the test log-likelihood is not finite", "lower `lr` or tighten `rtol`/`atol`")
    return {"test_nll": nll, "bits_per_dim": nll / (model.dim * math.log(2)), "nfe_per_forward": nfe / max(batches, 1)}


@torch.no_grad()
def density_grid(model: CNF, points: Tensor, device: torch.device, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log p(x) of ``model`` on a size x size grid covering ``points`` (for the density plot)."""
    lo = float(points.min()) - 0.5
    hi = float(points.max()) + 0.5
    axis = torch.linspace(lo, hi, size)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    model.eval()
    log_p = torch.cat([model.log_prob(grid[i : i + 1024].to(device)).cpu() for i in range(0, len(grid), 1024)])
    return gx.numpy(), gy.numpy(), log_p.reshape(size, size).numpy()
