"""Polynomial chaos expansion (thesis eq. 6.18-6.20) in an orthonormal probabilists' Hermite basis.

The basis is ``phi_alpha(z) = prod_j He_{alpha_j}(z_j) / sqrt(alpha_j!)`` over all multi-indices
with ``|alpha| <= p``: orthonormal under the standard Gaussian measure, so the least-squares Gram
matrix of standardised inputs is close to the identity. (The thesis' physicists' recurrence
eq. 6.19 spans the same space but its Gram matrix is badly scaled: H_p has norm ~ sqrt(2^p p!).)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

import torch
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError

MAX_BASIS = 20_000  # the Gram matrix is MAX_BASIS^2 doubles (3.2 GB); beyond that use a lower r or p


def basis_size(dim: int, degree: int) -> int:
    """Number of multi-indices alpha in N^dim with |alpha| <= degree: C(dim + degree, degree)."""
    return math.comb(dim + degree, degree)


def multi_indices(dim: int, degree: int) -> list[tuple[int, ...]]:
    """All multi-indices with |alpha| <= degree, by total degree then lexicographically."""
    out = []
    for total in range(degree + 1):
        for combo in combinations_with_replacement(range(dim), total):
            alpha = [0] * dim
            for j in combo:
                alpha[j] += 1
            out.append(tuple(alpha))
    return out


def hermite_orthonormal(z: Tensor, degree: int) -> Tensor:
    """He_k(z) / sqrt(k!) for k = 0..degree, stacked on a new last axis.

    Recurrence of the normalised polynomials: h_{k+1} = (z h_k - sqrt(k) h_{k-1}) / sqrt(k+1).
    """
    if degree < 0:
        raise UsageError(f"polynomial degree must be >= 0, got {degree}")
    values = [torch.ones_like(z)]
    if degree >= 1:
        values.append(z)
    for k in range(1, degree):
        values.append((z * values[k] - math.sqrt(k) * values[k - 1]) / math.sqrt(k + 1))
    return torch.stack(values, dim=-1)


def _factor_table(dim: int, degree: int) -> tuple[Tensor, Tensor]:
    """(n_basis, slots) variable and degree of each factor; unused slots are (0, 0) = He_0 = 1.

    A total-degree-p basis function has at most p non-constant factors, so evaluating the
    basis is one gather and one product over p slots instead of a loop over all dim variables.
    """
    slots = max(degree, 1)
    variables, degrees = [], []
    for total in range(degree + 1):
        for combo in combinations_with_replacement(range(dim), total):
            counts: dict[int, int] = {}
            for j in combo:
                counts[j] = counts.get(j, 0) + 1
            pairs = sorted(counts.items()) + [(0, 0)] * (slots - len(counts))
            variables.append([v for v, _ in pairs])
            degrees.append([d for _, d in pairs])
    return torch.tensor(variables, dtype=torch.long), torch.tensor(degrees, dtype=torch.long)


class PCELayer(nn.Module):
    """y = C^T phi(z): all orthonormal Hermite products of total degree <= p, then a linear map.

    The linear map (``self.linear``, n_basis -> out_features, bias off because phi_0 = 1 is the
    constant term) holds the coefficients c_alpha; they train like any other weight.
    """

    gather_index: Tensor
    linear: nn.Linear

    def __init__(self, dim: int, degree: int, out_features: int) -> None:
        super().__init__()
        if dim < 1:
            raise UsageError(f"PCE input dimension must be >= 1, got {dim}")
        if degree < 1:
            raise UsageError(f"PCE degree must be >= 1, got {degree}", "the thesis uses p = 2")
        n_basis = basis_size(dim, degree)
        if n_basis > MAX_BASIS:
            raise UsageError(
                f"a degree-{degree} PCE in {dim} variables has {n_basis} basis functions (limit {MAX_BASIS})",
                "lower --rank or --degree",
            )
        self.dim, self.degree, self.out_features = dim, degree, out_features
        variables, degrees = _factor_table(dim, degree)
        # Rebuilt from (dim, degree) on construction, so they stay out of the checkpoint.
        self.register_buffer("gather_index", variables * (degree + 1) + degrees, persistent=False)
        self.linear = nn.Linear(n_basis, out_features, bias=False)

    @property
    def n_basis(self) -> int:
        return int(self.gather_index.shape[0])

    def basis(self, z: Tensor) -> Tensor:
        """phi(z): (B, dim) -> (B, n_basis)."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise UsageError(f"PCE layer expects inputs of shape (B, {self.dim}), got {tuple(z.shape)}")
        table = hermite_orthonormal(z, self.degree).reshape(z.shape[0], -1)
        return table[:, self.gather_index].prod(dim=-1)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(self.basis(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, degree={self.degree}, n_basis={self.n_basis}, out_features={self.out_features}"


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
        raise UsageError(f"ridge must be >= 0, got {ridge}")
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
            f"2 x {n} = {2 * n} (m_PCE >= 2 C(r+p, p)): expect overfitting; lower --rank/--degree or add --ridge"
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
