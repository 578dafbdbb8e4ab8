"""Predictions and success counts shared by every attack: clean predictions, fooling rates,
and the sums and gathers that make a sharded (torchrun) set score like the whole set."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from odekit.distributed import shard_indices
from odekit.methods.attacks.space import apply_perturbation
from odekit.stats import Proportion

if TYPE_CHECKING:
    from odekit.distributed import Distributed


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def predict_on(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted classes of ``x`` (on the model's device)."""
    dev = model_device(model)
    out = [model(x[i : i + batch_size].to(dev)).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=dev)


def attack_success(pred: Tensor, clean: Tensor, target: int | None = None) -> Proportion:
    """Untargeted: every sample counts and succeeds when its prediction changes. Targeted:
    samples whose clean prediction is not ``target`` count, and succeed when predicted as it."""
    clean = clean.to(pred.device)
    if target is None:
        return Proportion(int((pred != clean).sum()), len(pred))
    counted = clean != target
    return Proportion(int((pred[counted] == target).sum()), int(counted.sum()))


def summed_over_ranks(p: Proportion, dist: Distributed | None) -> Proportion:
    """``p``'s counts summed over the ranks of ``dist`` (unchanged without one): the rate of a
    sharded set is exactly the rate one process gets on the whole set."""
    if dist is None or dist.world_size == 1:
        return p
    successes, n = dist.sum_numbers(p.successes, p.n)
    return Proportion(int(successes), int(n))


def gather_shards(t: Tensor, n: int, dist: Distributed) -> Tensor:
    """The whole (n, ...) tensor on every rank from each rank's `Distributed.shard` rows ``t``
    (padded to the largest shard for the collective, then cut back)."""
    if dist.world_size == 1:
        return t
    sizes = [len(shard_indices(n, r, dist.world_size)) for r in range(dist.world_size)]
    pad = t.new_zeros((max(sizes) - len(t), *t.shape[1:]))
    parts = dist.all_gather(torch.cat([t, pad]))
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def fooling_rate(
    model: nn.Module,
    x: Tensor,
    v: Tensor,
    clean_pred: Tensor,
    batch_size: int = 512,
    target: int | None = None,
    dist: Distributed | None = None,
) -> float:
    """Eq. 6.37: fraction of samples whose prediction changes under x + v (clipped to the box);
    with ``target``, the fraction of the others that land on it. With ``dist``, ``x`` is this
    rank's shard and the counts are summed over the ranks (every rank gets the global rate)."""
    if len(x) == 0 and dist is None:
        return float("nan")
    pred = predict_on(model, apply_perturbation(x, v), batch_size) if len(x) else clean_pred[:0]
    return summed_over_ranks(attack_success(pred, clean_pred, target), dist).rate
