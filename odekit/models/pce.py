"""Polynomial chaos expansion (thesis eq. 6.18-6.20) in an orthonormal probabilists' Hermite basis.

The basis is ``phi_alpha(z) = prod_j He_{alpha_j}(z_j) / sqrt(alpha_j!)`` over all multi-indices
with ``|alpha| <= p``: orthonormal under the standard Gaussian measure, so the least-squares Gram
matrix of standardised inputs is close to the identity. (The thesis' physicists' recurrence
eq. 6.19 spans the same space but its Gram matrix is badly scaled: H_p has norm ~ sqrt(2^p p!).)
"""

from __future__ import annotations

import math
from itertools import combinations_with_replacement

import torch
from torch import Tensor, nn

from odekit.errors import UsageError

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
                "lower `rank` or `degree`",
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
