"""Maximum-volume row selection: square maxvol (Goreinov et al. 2010) and rectangular maxvol
(Mikhalev & Oseledets 2018), in torch, on any device.

``maxvol(A)`` (A: n x r, n >= r) returns r row indices S such that every entry of the
coefficient matrix ``C = A A[S]^{-1}`` satisfies ``|C_ij| <= tol`` (a "dominant" submatrix).

``rect_maxvol(A)`` returns P >= r rows (r <= P <= 2r by default) by greedily adding the row of
largest coefficient norm; on return either every row of ``C = A A[S]^+`` (n x P) has
``||C_i||_2 <= tol`` or P reached ``max_rows``. Then ``||A A[S]^+||_2`` is bounded as in
eq. 5.19 of the thesis (Lemma 4.3 of the rect-maxvol paper); see ``rect_maxvol_error_factor``.

Arithmetic is done in float64 internally; only indices are returned (plus, on request, C).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from odekit.errors import NumericalError, UsageError

__all__ = ["maxvol", "maxvol_coefficients", "rect_maxvol", "rect_maxvol_error_factor"]


def _lu_pivot_rows(a: Tensor) -> Tensor:
    """First r rows chosen by partial-pivoting LU of a (b, n, r) -> (b, r) indices."""
    b, n, r = a.shape
    _, piv, _ = torch.linalg.lu_factor_ex(a)  # LAPACK-style 1-based row swaps, (b, r)
    piv = piv.long() - 1
    perm = torch.arange(n, device=a.device).expand(b, n).clone()
    ar = torch.arange(b, device=a.device)
    for k in range(min(n, r)):
        p = piv[:, k]
        pk = perm[ar, k].clone()
        perm[ar, k] = perm[ar, p]
        perm[ar, p] = pk
    return perm[:, :r]


def _solve_coefficients(a: Tensor, idx: Tensor) -> Tensor:
    """C = A A[idx]^{-1} for batched a (b, n, r) and idx (b, r)."""
    sub = torch.gather(a, 1, idx.unsqueeze(-1).expand(-1, -1, a.shape[2]))
    # C sub = A  <=>  sub^T C^T = A^T
    ct, info = torch.linalg.solve_ex(sub.transpose(1, 2), a.transpose(1, 2))
    if bool((info != 0).any()):
        ct = torch.full_like(ct, float("nan"))
    return ct.transpose(1, 2)


def _check_matrix(a: Tensor, what: str) -> None:
    if a.dim() < 2:
        raise UsageError(
            f"{what} needs a matrix (n x r) or a batch of them, got shape {tuple(a.shape)}"
        )
    n, r = a.shape[-2], a.shape[-1]
    if r < 1 or n < r:
        raise UsageError(f"{what} needs a tall matrix with n >= r >= 1, got {n} x {r}")
    if not bool(torch.isfinite(a).all()):
        raise NumericalError(f"{what}: the matrix holds NaN or inf")


def maxvol(
    a: Tensor,
    tol: float = 1.05,
    max_iters: int = 100,
    return_coefficients: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Square maxvol. ``a``: (n, r) or batched (..., n, r). Returns indices (..., r) (and C).

    Starts from the pivot rows of an LU factorisation, then swaps the row/column pair of
    largest |C_ij| while it exceeds ``tol`` (each swap multiplies the volume by |C_ij| > 1),
    updating C by a rank-one Sherman-Morrison step.
    """
    _check_matrix(a, "maxvol")
    if tol < 1.0:
        raise UsageError(f"maxvol tol must be >= 1, got {tol}")
    batch_shape = a.shape[:-2]
    n, r = a.shape[-2], a.shape[-1]
    a64 = a.reshape(-1, n, r).to(torch.float64)
    b = a64.shape[0]
    sv = torch.linalg.svdvals(a64)
    rank_tol = sv[:, :1] * max(n, r) * torch.finfo(torch.float64).eps * 10
    deficient = NumericalError(
        "maxvol: the matrix is rank deficient (no invertible r x r submatrix)",
        "lower the rank so that the columns are linearly independent",
    )
    if bool((sv[:, -1:] <= rank_tol).any()):
        raise deficient
    idx = _lu_pivot_rows(a64)
    c = _solve_coefficients(a64, idx)
    if not bool(torch.isfinite(c).all()):
        raise deficient
    ar = torch.arange(b, device=a.device)
    eye_r = torch.eye(r, dtype=torch.float64, device=a.device)
    for _ in range(max_iters):
        flat = c.abs().reshape(b, -1)
        val, pos = flat.max(dim=1)
        active = val > tol
        if not bool(active.any()):
            break
        i, j = pos // r, pos % r
        cij = c[ar, i, j]
        col = c[ar, :, j]  # (b, n)
        row = c[ar, i, :] - eye_r[j]  # (b, r)
        scale = torch.where(active, 1.0 / cij, torch.zeros_like(cij))
        c = c - col.unsqueeze(2) * (row * scale.unsqueeze(1)).unsqueeze(1)
        idx[ar[active], j[active]] = i[active]
    idx = idx.reshape(*batch_shape, r)
    if return_coefficients:
        return idx, c.reshape(*batch_shape, n, r).to(a.dtype)
    return idx


def _rect_maxvol_single(
    a: Tensor, tol: float, min_rows: int, max_rows: int, start_iters: int
) -> tuple[Tensor, Tensor]:
    n, r = a.shape
    idx0, c = maxvol(a, tol=1.0 + 1e-9, max_iters=start_iters, return_coefficients=True)
    c = c.to(torch.float64)
    chosen = torch.zeros(n, dtype=torch.bool, device=a.device)
    chosen[idx0] = True
    index = [int(k) for k in idx0.tolist()]
    # C grows one column per added row; preallocate n x max_rows
    cbig = torch.zeros(n, max_rows, dtype=torch.float64, device=a.device)
    cbig[:, :r] = c
    norms = c.pow(2).sum(1).masked_fill(chosen, -1.0)
    k = r
    tol_sq = tol * tol
    while k < max_rows:
        i = int(torch.argmax(norms))
        if float(norms[i]) <= tol_sq and k >= min_rows:
            break
        if float(norms[i]) < 0:  # every row is already chosen
            break
        ci = cbig[i, :k].clone()
        v = cbig[:, :k] @ ci  # (n,)
        lam = 1.0 / (1.0 + float(ci @ ci))
        cbig[:, :k] -= lam * torch.outer(v, ci)
        cbig[:, k] = lam * v
        norms = norms - lam * v.pow(2)
        chosen[i] = True
        norms = norms.masked_fill(chosen, -1.0)
        index.append(i)
        k += 1
    idx = torch.tensor(index, dtype=torch.long, device=a.device)
    return idx, cbig[:, :k]


def rect_maxvol(
    a: Tensor,
    tol: float = 1.0,
    max_rows: int | None = None,
    min_rows: int | None = None,
    start_maxvol_iters: int = 100,
    return_coefficients: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Rectangular maxvol. ``a``: (n, r) or batched (..., n, r) (batches are looped).

    Returns P row indices, ``min_rows <= P <= max_rows`` (defaults r and min(2r, n)); the first
    r are a square maxvol. Rows are added greedily while some row of the coefficient matrix
    ``C = A A[S]^+`` has norm above ``tol`` (or fewer than ``min_rows`` are chosen). With
    ``return_coefficients`` also returns C (n x P).
    """
    _check_matrix(a, "rect_maxvol")
    n, r = a.shape[-2], a.shape[-1]
    max_rows = min(2 * r, n) if max_rows is None else int(max_rows)
    min_rows = r if min_rows is None else int(min_rows)
    if tol <= 0:
        raise UsageError(f"rect_maxvol tol must be positive, got {tol}")
    if not r <= min_rows <= max_rows <= n:
        raise UsageError(
            f"rect_maxvol needs r <= min_rows <= max_rows <= n, got r={r}, "
            f"min_rows={min_rows}, max_rows={max_rows}, n={n}"
        )
    if a.dim() == 2:
        idx, c = _rect_maxvol_single(
            a.to(torch.float64), tol, min_rows, max_rows, start_maxvol_iters
        )
        return (idx, c.to(a.dtype)) if return_coefficients else idx
    flat = a.reshape(-1, n, r)
    results = [
        _rect_maxvol_single(m.to(torch.float64), tol, min_rows, max_rows, start_maxvol_iters)
        for m in flat
    ]
    sizes = {int(res[0].shape[0]) for res in results}
    if len(sizes) != 1:
        raise UsageError(
            "batched rect_maxvol chose different numbers of rows per matrix",
            "set min_rows == max_rows for batched calls, or loop over the batch",
        )
    idx = torch.stack([res[0] for res in results]).reshape(*a.shape[:-2], -1)
    if return_coefficients:
        c = torch.stack([res[1] for res in results]).reshape(*a.shape[:-2], n, -1).to(a.dtype)
        return idx, c
    return idx


def maxvol_coefficients(a: Tensor, idx: Tensor) -> Tensor:
    """C = A A[idx]^+ (n x P), computed in float64 by least squares."""
    a64 = a.to(torch.float64)
    sub = a64[idx]
    return (a64 @ torch.linalg.pinv(sub)).to(a.dtype)


def rect_maxvol_error_factor(d: int, p: int, r: int) -> float:
    """Eq. 5.19/5.20: sqrt(1 + (D - P) R / (P + 1 - R)), the amplification of the low-rank
    residual by the sampled solve, for a P-row rect-maxvol submatrix of a D x R basis."""
    if not 1 <= r <= p <= d:
        raise UsageError(f"error factor needs 1 <= R <= P <= D, got D={d}, P={p}, R={r}")
    return math.sqrt(1.0 + (d - p) * r / (p + 1 - r))
