"""The active subspace (thesis Algorithm 2): per-sample gradients streamed into a frequent-directions sketch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError
from odekit.io.datasets import Split
from odekit.linalg import FrequentDirections, active_count, energy_rank
from odekit.linalg.sketch import merge_across_ranks
from odekit.methods.asnet.settings import (
    SubspaceSettings,
)
from odekit.models.cut import (
    Cut,
    CutModel,
)
from odekit.progress import Progress
from odekit.streaming import per_sample_activation_grads

# ----------------------------------------------------------------------------- active subspace


@dataclass
class ActiveSubspace:
    """Sketch of G = [grad c_l(x^1), ..., grad c_l(x^m)]^T and what it says (eq. 6.15-6.17)."""

    singular_values: Tensor  # all sketch singular values, descending
    V: Tensor  # (n_l, k) leading right singular vectors of the sketch
    total_energy: float  # ||G||_F^2 = trace(m C), exact
    covariance_error: float  # certified ||G^T G - S^T S||_2 of the sketch
    n_samples: int
    mean_activation: Tensor  # (n_l,) mean pre-model output, for the PCA baseline
    seconds: float

    @property
    def covariance_error_rel(self) -> float:
        """The certified sketch covariance error relative to sigma_1^2."""
        return self.covariance_error / max(float(self.singular_values[0]) ** 2, 1e-300)

    def active_neurons(self, eps: float) -> int:
        """Eq. 6.17 on the sketch's singular values."""
        return active_count(self.singular_values, eps, form="eq6.17")

    def active_neurons_eq612(self, eps: float) -> int:
        """Eq. 6.12 with the exact total energy in the denominator (saturates at the sketch size)."""
        return energy_rank(self.singular_values, 1.0 - eps, total_energy=self.total_energy)

    def eps_at_rank(self, rank: int) -> float:
        """(lambda_{r+1} + ... + lambda_n) / (lambda_1 + ... + lambda_n), as in table 6.1. The sketch
        under-estimates every leading eigenvalue, so this is an upper bound on the exact value."""
        if self.total_energy <= 0:
            return 0.0
        kept = float(self.singular_values[:rank].double().pow(2).sum())
        return max(0.0, 1.0 - kept / self.total_energy)


def _train_batches(split: Split, settings: SubspaceSettings) -> tuple[Split, int]:
    sub = split.subset(settings.samples, seed=settings.seed)
    return sub, sub.num_batches(settings.batch_size)


def active_subspace(
    chain: CutModel,
    cut: Cut,
    split: Split,
    settings: SubspaceSettings,
    device: torch.device,
    keep: int | None = None,
    progress: Progress | None = None,
    on_batch: Callable[[Tensor, Tensor], None] | None = None,
    dist: Distributed | None = None,
) -> ActiveSubspace:
    """Algorithm 3: stream per-sample gradients of c_l through a frequent-directions sketch.

    ``keep`` right singular vectors are returned (default: as many as the sketch holds);
    ``on_batch(activations, labels)`` sees every batch's pre-model output (for baselines).
    ``dist`` (several ranks): each rank streams its shard of the samples, the sketches are
    merged on rank 0, whose singular vectors (and the summed statistics) every rank receives.
    """
    start = time.perf_counter()
    sub, total = _train_batches(split, settings)
    if dist is not None and dist.world_size > 1:
        part = dist.shard(len(sub))
        sub = Split(sub.x[part.start : part.stop], sub.y[part.start : part.stop])
        total = sub.num_batches(settings.batch_size)
    fd = FrequentDirections(cut.features, settings.sketch_size, device=device)
    act_sum = torch.zeros(cut.features, dtype=torch.float64, device=device)
    labels = iter(sub.batches(settings.batch_size))
    grad_model, cut_module = chain.gradient_model(cut)
    grads = per_sample_activation_grads(
        grad_model, cut_module, sub.batches(settings.batch_size, device),
        loss="cross_entropy", target="label", return_activations=True, progress=progress, total=total,
    )  # fmt: skip
    for g, a in grads:  # type: ignore[misc]
        fd.update(g)
        act_sum += a.double().sum(0)
        if on_batch is not None:
            on_batch(a, next(labels)[1])
    if dist is not None and dist.world_size > 1:
        return _merged_subspace(fd, act_sum, cut.features, keep, dist, start)
    if fd.n_rows == 0:
        raise NumericalError("no samples reached the gradient sketch", "use a non-empty training split")
    limit = min(fd.sketch_size, cut.features)
    k = min(keep or limit, limit)
    s_all = fd.singular_values()
    _, v = fd.right_singular(k)
    return ActiveSubspace(
        singular_values=s_all.cpu(),
        V=v,
        total_energy=fd.frobenius_sq,
        covariance_error=fd.covariance_error_bound(),
        n_samples=fd.n_rows,
        mean_activation=act_sum / fd.n_rows,
        seconds=time.perf_counter() - start,
    )


def _merged_subspace(
    fd: FrequentDirections, act_sum: Tensor, features: int, keep: int | None, dist: Distributed, start: float
) -> ActiveSubspace:
    """Merge the ranks' gradient sketches on rank 0; every rank gets its singular structure."""
    act_sum = dist.all_reduce_sum(act_sum)
    merged, merge = merge_across_ranks(fd, dist)
    if merge.n_rows == 0:
        raise NumericalError("no samples reached the gradient sketch", "use a non-empty training split")
    limit = min(fd.sketch_size, features)
    k = min(keep or limit, limit)
    found: dict[str, Tensor] = {}
    if merged is not None:
        _, v = merged.right_singular(k)
        found = {"s": merged.singular_values(), "v": v, "energy": torch.tensor([merged.frobenius_sq])}
    got = dist.broadcast_tensors(found)
    return ActiveSubspace(
        singular_values=got["s"].cpu(),
        V=got["v"],
        total_energy=float(got["energy"][0]),
        covariance_error=merge.covariance_error_bound,
        n_samples=merge.n_rows,
        mean_activation=act_sum / merge.n_rows,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def stream_features(pre: nn.Module, split: Split, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(pre-model output, labels) per batch, model in eval mode (restored afterwards)."""
    was_training = pre.training
    pre.eval()
    try:
        for x, y in split.batches(batch_size, device):
            yield pre(x), y
    finally:
        pre.train(was_training)
