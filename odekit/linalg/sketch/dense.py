"""Dense helpers shared by the sketches: device argument, row checks, the wide SVD."""

from __future__ import annotations

import torch
from torch import Tensor

from odekit.errors import UsageError


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _wide_svd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values and right singular vectors (rows of Vh) of a wide m x D matrix.

    Exact (LAPACK) SVD of the tall transpose, which is several times faster than
    ``svd(m)`` on CPU for m << D."""
    if m.shape[0] < m.shape[1]:
        u, s, _ = torch.linalg.svd(m.T, full_matrices=False)
        return s, u.T
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    return s, vh



def _check_rows(rows: Tensor, dim: int) -> Tensor:
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    if rows.dim() != 2:
        rows = rows.reshape(rows.shape[0], -1)
    if rows.shape[1] != dim:
        raise UsageError(
            f"sketch expects rows of dimension {dim}, got {rows.shape[1]}",
            "flatten each sample to one row of the sketched dimension",
        )
    return rows

