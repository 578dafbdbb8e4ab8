"""The ASNet head: projection onto the standardised active subspace, PCE fit, L1 proximal steps, sparse cost."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.io.datasets import Split
from odekit.linalg import FrequentDirections
from odekit.methods.asnet.subspace import (
    stream_features,
)
from odekit.methods.pce import MAX_BASIS, PCEFit, PCELayer, basis_size, fit_pce
from odekit.models.layers import COMPUTE_TYPES, layer_table

# ----------------------------------------------------------------------------- ASNet build


def max_rank_for_samples(samples: int, degree: int) -> int:
    """Largest r with 2 C(r + p, p) <= samples (thesis ch. 6.3.5), at least 1."""
    r = 1
    while 2 * basis_size(r + 1, degree) <= samples and basis_size(r + 1, degree) <= MAX_BASIS:
        r += 1
    return r


@torch.no_grad()
def _standardise_into(linear: nn.Linear, V: Tensor, z_mean: Tensor, z_std: Tensor) -> None:
    """AS layer = diag(1/sigma) V_1^T x - mu/sigma: z is standardised, which is the measure
    the orthonormal Hermite basis is orthonormal under."""
    linear.weight.copy_((V / z_std.unsqueeze(0)).T.to(linear.weight.dtype))
    linear.bias.copy_((-z_mean / z_std).to(linear.bias.dtype))


@dataclass
class Projection:
    """Small per-sample matrices from one streamed pass: z = (x - center) W for each
    projection, teacher logits, labels, and (capped) raw features for the LR baseline."""

    z: dict[str, Tensor]
    logits: Tensor | None
    labels: Tensor
    features: np.ndarray | None


@torch.no_grad()
def project(
    pre: nn.Module,
    split: Split,
    maps: dict[str, tuple[Tensor, Tensor | None]],
    batch_size: int,
    device: torch.device,
    post: nn.Module | None = None,
    sketch: FrequentDirections | None = None,
    center: Tensor | None = None,
    keep_features: int = 0,
) -> Projection:
    """One pass of the pre-model over ``split``. ``maps`` name -> (W (n_l, r), center or None);
    ``post`` adds the teacher's logits; ``sketch`` receives the rows x - ``center`` (PCA)."""
    zs: dict[str, list[Tensor]] = {name: [] for name in maps}
    logits, labels, feats, kept = [], [], [], 0
    if post is not None:
        post.eval()
    for f, y in stream_features(pre, split, batch_size, device):
        flat = f.flatten(1).double()
        for name, (W, c) in maps.items():
            zs[name].append(((flat - c if c is not None else flat) @ W).cpu())
        if post is not None:
            logits.append(post(f).double().cpu())
        if sketch is not None:
            sketch.update(flat - center if center is not None else flat)
        if kept < keep_features:
            feats.append(flat[: keep_features - kept].float().cpu().numpy())
            kept += len(feats[-1])
        labels.append(y.cpu())
    return Projection(
        {name: torch.cat(v) for name, v in zs.items()},
        torch.cat(logits) if logits else None,
        torch.cat(labels),
        np.concatenate(feats) if feats else None,
    )


def _chunks(a: Tensor, b: Tensor, size: int = 4096) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, a.shape[0], size):
        yield a[i : i + size], b[i : i + size]


@dataclass
class Head:
    """Standardisation (mu, sigma) of z and a PCE fitted on the standardised z."""

    mu: Tensor
    sigma: Tensor
    pce: PCELayer
    fit: PCEFit

    def standardise(self, z: Tensor) -> Tensor:
        return (z - self.mu) / self.sigma

    @torch.no_grad()
    def accuracy(self, z: Tensor, labels: Tensor) -> float:
        pred = self.pce(self.standardise(z).to(self.pce.linear.weight.dtype)).argmax(1)
        return float((pred == labels).float().mean())


def fit_head(z: Tensor, logits: Tensor, degree: int, ridge: float, dist: Distributed | None = None) -> Head:
    """Standardise z with its own statistics and fit a degree-p PCE to the logits (eq. 6.20).
    ``dist``: z and logits are this rank's shard; statistics and normal equations are summed."""
    if dist is not None and dist.world_size > 1:
        n = dist.sum_numbers(z.shape[0])[0]
        mu = dist.all_reduce_sum(z.sum(0)) / n
        sigma = (dist.all_reduce_sum((z - mu).pow(2).sum(0)) / n).sqrt().clamp_min(1e-8)
    else:
        mu = z.mean(0)
        sigma = z.std(0, unbiased=False).clamp_min(1e-8)
    pce = PCELayer(z.shape[1], degree, logits.shape[1]).double()
    fit = fit_pce(pce, _chunks((z - mu) / sigma, logits), ridge=ridge, dist=dist)
    return Head(mu, sigma, pce, fit)


def _l1_prox(l1: float) -> Callable[[nn.Module, Callable[[Tensor], float]], None]:
    """Soft-thresholding S_{lr * lambda} (eq. 6.29) on every conv/linear weight after each
    step, with each weight's own current learning rate."""

    @torch.no_grad()
    def step(model: nn.Module, lr_of: Callable[[Tensor], float]) -> None:
        for module in model.modules():
            if isinstance(module, COMPUTE_TYPES):
                w = module.weight
                assert isinstance(w, Tensor)
                t = lr_of(w) * l1
                w.copy_(w.sign() * (w.abs() - t).clamp_min(0.0))

    return step


def sparse_cost(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> dict[str, float | int]:
    """Non-zero weights, their float32 storage (values only, as thesis ASNet-s) and FLOPs
    scaled by each layer's weight density."""
    summary = layer_table(model, input_shape)
    modules = dict(model.named_modules())
    flops = 0.0
    for layer in summary.layers:
        w = modules[layer.name].weight
        flops += layer.flops * float((w != 0).float().mean())
    nonzero = sum(int((t != 0).sum()) for t in model.state_dict().values() if t.is_floating_point())
    total = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    return {"nonzero_params": nonzero, "density": nonzero / max(total, 1), "storage_mb_nonzero": nonzero * 4 / 2**20,
            "flops_nonzero": round(flops)}  # fmt: skip
