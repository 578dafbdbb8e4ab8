"""Least-squares fit of a PCE layer's coefficients (thesis eq. 6.20); the layer and its
orthonormal Hermite basis live in ``odekit.models.pce``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError
from odekit.models.pce import (
    MAX_BASIS,
    PCELayer,
    basis_size,
    hermite_orthonormal,
    multi_indices,
)

__all__ = ["MAX_BASIS", "PCEFit", "PCELayer", "basis_size", "fit_pce", "hermite_orthonormal", "multi_indices"]


@dataclass
class PCEFit:
    """Outcome of a least-squares coefficient fit (eq. 6.20)."""

    n_samples: int
    n_basis: int
    residual: float  # delta* of eq. 6.21: mean over samples of ||y - psi(z)||^2
    ridge: float
    gram_condition: float  # condition number of the (regularised) Gram matrix actually solved
    rank_deficient: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "n_samples": self.n_samples,
            "n_basis": self.n_basis,
            "samples_per_basis_function": self.n_samples / self.n_basis,
            "train_residual": self.residual,
            "ridge": self.ridge,
            "gram_condition": self.gram_condition,
            "rank_deficient": self.rank_deficient,
        }


@torch.no_grad()
def fit_pce(
    layer: PCELayer,
    batches: Iterable[tuple[Tensor, Tensor]],
    ridge: float = 0.0,
    rcond: float = 1e-10,
    dist: Distributed | None = None,
) -> PCEFit:
    """Set ``layer``'s coefficients to the least-squares fit of targets y from inputs z.

    ``batches`` yields (z (B, dim), y (B, out)); only the normal equations (n_basis^2 and
    n_basis x out numbers) are accumulated, in float64. ``ridge`` adds ridge * I to Phi^T Phi / m.
    The solve is an eigendecomposition of the Gram matrix that drops eigenvalues below
    ``rcond`` x the largest, i.e. the minimum-norm solution when there are fewer samples than
    basis functions. Warns (in ``PCEFit.warnings``) when m < 2 x n_basis (thesis ch. 6.3.5).
    ``dist``: each rank streams its own shard; the normal equations are summed over ranks
    before the solve, so every rank gets the fit of the whole data set.
    """
    if ridge < 0:
        raise UsageError(f"`ridge` must be >= 0, got {ridge}")
    n = layer.n_basis
    device = layer.linear.weight.device
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    rhs = torch.zeros(n, layer.out_features, dtype=torch.float64, device=device)
    y_sq, m = 0.0, 0
    for z, y in batches:
        phi = layer.basis(z.to(device=device, dtype=torch.float64))
        y64 = y.to(device=device, dtype=torch.float64)
        if y64.shape[1] != layer.out_features:
            raise UsageError(f"PCE targets have {y64.shape[1]} outputs, the layer has {layer.out_features}")
        gram += phi.T @ phi
        rhs += phi.T @ y64
        y_sq += float(y64.pow(2).sum())
        m += z.shape[0]
    if dist is not None and dist.world_size > 1:
        gram, rhs = dist.all_reduce_sum(gram), dist.all_reduce_sum(rhs)
        y_sq, m_sum = dist.sum_numbers(y_sq, m)
        m = int(m_sum)
    if m == 0:
        raise NumericalError("no samples to fit the polynomial chaos expansion", "give a non-empty data set")
    if not bool(torch.isfinite(gram).all()):
        raise NumericalError("the PCE basis overflowed (NaN/inf)", "check the active-subspace inputs")
    gram_m, rhs_m = gram / m, rhs / m
    system = gram_m + ridge * torch.eye(n, dtype=torch.float64, device=device)
    evals, evecs = torch.linalg.eigh(system)
    top = float(evals[-1])
    keep = evals > rcond * max(top, 1e-300)
    inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    coef = evecs @ (inv.unsqueeze(1) * (evecs.T @ rhs_m))
    # delta* = (1/m) sum ||y - Phi c||^2 = (y^T y - 2 c^T Phi^T y + c^T Phi^T Phi c) / m
    residual = (y_sq / m - 2 * float((coef * rhs_m).sum()) + float((coef * (gram_m @ coef)).sum()))
    layer.linear.weight.copy_(coef.T.to(layer.linear.weight.dtype))
    warnings = []
    if m < 2 * n:
        warnings.append(
            f"PCE fit uses {m} samples for {n} basis functions; the thesis asks for at least "
            f"2 x {n} = {2 * n} (m_PCE >= 2 C(r+p, p)): expect overfitting; lower `rank`/`degree` or add `ridge`"
        )
    kept = evals[keep]
    return PCEFit(
        n_samples=m,
        n_basis=n,
        residual=max(residual, 0.0),
        ridge=ridge,
        gram_condition=float(kept[-1] / kept[0]) if kept.numel() else float("inf"),
        rank_deficient=bool((~keep).any()),
        warnings=warnings,
    )
