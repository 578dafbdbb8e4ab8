"""Count sketch: a hashing sketch, fast per row, mergeable by summation."""

from __future__ import annotations

import torch
from torch import Tensor

from odekit.errors import NumericalError, UsageError
from odekit.linalg.sketch.dense import _as_device, _check_rows, _wide_svd


class CountSketch:
    """Count sketch (hashing) ``C = S A`` with S (m x N): row i of A is added with a random
    sign to a random bucket. ``E[C^T C] = A^T A``; mergeable by summation. Faster than
    frequent directions per row, but only probabilistic guarantees (eps ~ 1/sqrt(m))."""

    def __init__(
        self,
        dim: int,
        sketch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
    ) -> None:
        if dim < 1 or sketch_size < 1:
            raise UsageError("count sketch needs a positive dim and sketch_size")
        self.dim = int(dim)
        self.sketch_size = int(sketch_size)
        self.device = _as_device(device)
        self.dtype = dtype
        self._table = torch.zeros(self.sketch_size, self.dim, device=self.device, dtype=dtype)
        self._gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.frobenius_sq = 0.0
        self.n_rows = 0

    def update(self, rows: Tensor) -> CountSketch:
        rows = _check_rows(rows, self.dim).to(device=self.device, dtype=self.dtype)
        b = rows.shape[0]
        if b == 0:
            return self
        bucket = torch.randint(0, self.sketch_size, (b,), generator=self._gen).to(self.device)
        sign = (torch.randint(0, 2, (b,), generator=self._gen) * 2 - 1).to(self.device, self.dtype)
        self._table.index_add_(0, bucket, rows * sign.unsqueeze(1))
        self.frobenius_sq += float(rows.pow(2).sum())
        self.n_rows += b
        return self

    def merge(self, other: CountSketch) -> CountSketch:
        if other.dim != self.dim or other.sketch_size != self.sketch_size:
            raise UsageError("cannot merge count sketches of different shapes")
        self._table += other._table.to(device=self.device, dtype=self.dtype)
        self.frobenius_sq += other.frobenius_sq
        self.n_rows += other.n_rows
        return self

    @property
    def sketch(self) -> Tensor:
        return self._table.clone()

    def right_singular(self, k: int) -> tuple[Tensor, Tensor]:
        limit = min(self.sketch_size, self.dim)
        if not 1 <= k <= limit:
            raise NumericalError(
                f"cannot take {k} singular directions from a {self.sketch_size} x {self.dim} sketch",
                f"use k <= {limit} or a larger sketch_size",
            )
        s, vh = _wide_svd(self._table)
        return s[:k].clone(), vh[:k].T.contiguous()
