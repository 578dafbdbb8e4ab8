"""Top-R right singular structure of a streamed matrix from a frequent-directions sketch, with
certified covariance and subspace error bounds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from odekit.errors import NumericalError, UsageError
from odekit.linalg.sketch.dense import _wide_svd
from odekit.linalg.sketch.frequent_directions import FrequentDirections


def subspace_sin_theta(u: Tensor, v: Tensor) -> float:
    """Sine of the largest principal angle between the column spans of u and v (both D x k,
    orthonormal columns): ``||(I - U U^T) V||_2``."""
    u = u.to(torch.float64)
    v = v.to(device=u.device, dtype=torch.float64)
    residual = v - u @ (u.T @ v)  # accurate for tiny angles, unlike sqrt(1 - cos^2)
    return float(torch.linalg.matrix_norm(residual, ord=2).clamp(max=1.0))


@dataclass(frozen=True)
class SVDResult:
    """Top-R right singular structure of a streamed N x D matrix A.

    ``singular_values`` (R,) and ``V`` (D x R) come from the sketch; ``sketch_singular_values``
    holds all of the sketch's values (for rank rules and decay plots). ``covariance_error`` is
    the certified bound on ||A^T A - B^T B||_2; ``subspace_error_bound`` a certified
    Davis-Kahan bound on sin(largest principal angle) between span(V) and the exact top-R
    right singular subspace: delta / (s_R^2 - s_{R+1}^2) with the sketch's s (valid because
    A^T A >= B^T B), capped at the trivial value 1.
    """

    singular_values: Tensor
    V: Tensor
    sketch_singular_values: Tensor
    covariance_error: float
    subspace_error_bound: float
    total_energy: float
    n_rows: int

    @property
    def rank(self) -> int:
        return int(self.singular_values.shape[0])


class StreamingSVD:
    """Top-R right singular vectors and values of stacked row batches, via frequent
    directions plus one small SVD at the end. Holds O(sketch_size x dim), never N x D."""

    def __init__(
        self,
        dim: int,
        rank: int | None = None,
        sketch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        shrink: str = "svd",
    ) -> None:
        if rank is not None and rank < 1:
            raise UsageError(f"rank must be positive, got {rank}")
        if sketch_size is None:
            if rank is None:
                raise UsageError("give a rank or a sketch_size for the streaming SVD")
            sketch_size = max(2 * rank, rank + 8)
        if rank is not None and rank > sketch_size:
            raise UsageError(
                f"rank {rank} exceeds the sketch size {sketch_size}",
                "use a sketch_size of at least 2 x rank",
            )
        self.rank = rank
        self.fd = FrequentDirections(dim, sketch_size, device=device, dtype=dtype, shrink=shrink)

    @property
    def dim(self) -> int:
        return self.fd.dim

    @property
    def n_rows(self) -> int:
        return self.fd.n_rows

    def update(self, rows: Tensor) -> StreamingSVD:
        self.fd.update(rows)
        return self

    def merge(self, other: StreamingSVD) -> StreamingSVD:
        self.fd.merge(other.fd)
        return self

    def result(self, rank: int | None = None) -> SVDResult:
        rank = rank if rank is not None else self.rank
        if rank is None:
            raise UsageError("give the rank to extract from the streaming SVD")
        if self.fd.n_rows == 0:
            raise NumericalError("the streaming SVD saw no rows", "feed at least one batch")
        if rank > self.fd.n_rows:
            raise NumericalError(
                f"rank {rank} needs at least {rank} samples, only {self.fd.n_rows} were streamed",
                "stream more samples or lower the rank",
            )
        limit = min(self.fd.sketch_size, self.fd.dim)
        if rank > limit:
            raise NumericalError(
                f"rank {rank} exceeds what a {self.fd.sketch_size} x {self.fd.dim} sketch holds",
                f"use rank <= {limit} or a larger sketch",
            )
        s_all, vh = _wide_svd(self.fd.sketch)
        delta = self.fd.delta
        gap = float(s_all[rank - 1] ** 2) - (
            float(s_all[rank] ** 2) if rank < s_all.shape[0] else 0.0
        )
        bound = min(1.0, delta / gap) if gap > 0 else 1.0
        return SVDResult(
            singular_values=s_all[:rank].clone(),
            V=vh[:rank].T.contiguous(),
            sketch_singular_values=s_all.clone(),
            covariance_error=delta,
            subspace_error_bound=bound,
            total_energy=self.fd.frobenius_sq,
            n_rows=self.fd.n_rows,
        )
