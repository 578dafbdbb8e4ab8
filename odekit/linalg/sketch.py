"""Streaming matrix sketches: frequent directions (deterministic) and count sketch (hashing).

Both summarise a tall matrix ``A`` (N x D) that arrives as row batches, holding only
O(sketch_size x D) numbers, and both are mergeable across shards or devices.

Frequent directions (Liberty 2013; Ghashami, Liberty, Phillips, Woodruff 2016) keeps
``B`` (ell x D) with

    0 <= x^T (A^T A - B^T B) x <= delta   for every unit x,
    delta <= ||A - A_k||_F^2 / (ell - k)  for every k < ell,

where ``delta`` is the sum of all shrinkage steps and is tracked exactly, so the sketch
certifies its own covariance error (``covariance_error_bound``). Every shrink uses an exact
SVD of the (at most 2 ell x D) buffer, and every row, including the first batch, enters it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError

__all__ = [
    "CountSketch",
    "FrequentDirections",
    "SVDResult",
    "SketchMerge",
    "StreamingSVD",
    "merge_across_ranks",
    "subspace_sin_theta",
]


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


def _gram_shrink_factors(m: Tensor, orth_sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the small Gram matrix m m^T: squared singular values (descending)
    and the left singular vectors U (m x k), so that rows of Vh are U^T m / s.

    ``orth_sq``: the first k rows of m are known to be mutually orthogonal with these squared
    norms (the previous shrink's output), which halves the cost of forming the Gram matrix."""
    if orth_sq is not None and orth_sq.numel() > 0:
        k = orth_sq.numel()
        old, new = m[:k], m[k:]
        cross = new @ old.T
        gram = torch.empty(m.shape[0], m.shape[0], dtype=m.dtype, device=m.device)
        gram[:k, :k] = torch.diag(orth_sq)
        gram[k:, :k] = cross
        gram[:k, k:] = cross.T
        gram[k:, k:] = new @ new.T
    else:
        gram = m @ m.T
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


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


class FrequentDirections:
    """Frequent-directions sketch of a stream of rows of dimension ``dim``.

    ``update(rows)`` accepts (B, dim) batches of any size; ``sketch`` returns the
    (sketch_size x dim) matrix ``B``; ``right_singular(k)`` the top-k singular values and right
    singular vectors of ``B`` (approximations of those of ``A``); ``merge(other)`` folds
    another sketch of the same shape in (the error bounds add up and still satisfy the
    a-priori bound for the concatenated stream).
    """

    def __init__(
        self,
        dim: int,
        sketch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        shrink: str = "svd",
    ) -> None:
        if dim < 1:
            raise UsageError(f"sketch dimension must be positive, got {dim}")
        if shrink not in ("svd", "gram"):
            raise UsageError(f"shrink must be 'svd' or 'gram', got '{shrink}'")
        if sketch_size < 1:
            raise UsageError(f"sketch size must be positive, got {sketch_size}")
        if not dtype.is_floating_point:
            raise UsageError(f"sketch dtype must be floating point, got {dtype}")
        self.dim = int(dim)
        self.sketch_size = int(sketch_size)
        self.device = _as_device(device)
        self.dtype = dtype
        self.shrink = shrink
        # Buffer of 2 ell rows: rows [0, filled) hold the current (unshrunk) sketch.
        self._buf = torch.zeros(2 * self.sketch_size, self.dim, device=self.device, dtype=dtype)
        self._filled = 0
        self._orth_sq: Tensor | None = None
        self.delta = 0.0  # total shrinkage: certified bound on ||A^T A - B^T B||_2
        self.frobenius_sq = 0.0  # ||A||_F^2 of everything that entered
        self.n_rows = 0
        self.n_shrinks = 0

    # ------------------------------------------------------------------ streaming
    def update(self, rows: Tensor) -> FrequentDirections:
        """Add a (B, dim) batch of rows (any B >= 0). Returns ``self``."""
        rows = _check_rows(rows, self.dim).to(device=self.device, dtype=self.dtype)
        if rows.shape[0] == 0:
            return self
        if not bool(torch.isfinite(rows).all()):
            raise NumericalError(
                "sketch input holds NaN or inf", "check the data and the model for overflow"
            )
        self.frobenius_sq += float(rows.pow(2).sum())
        self.n_rows += rows.shape[0]
        self._push(rows)
        return self

    def _push(self, rows: Tensor) -> None:
        cap = self._buf.shape[0]
        start = 0
        n = rows.shape[0]
        while start < n:
            take = min(cap - self._filled, n - start)
            self._buf[self._filled : self._filled + take] = rows[start : start + take]
            self._filled += take
            start += take
            if self._filled == cap:
                self._shrink()

    def _shrink(self) -> None:
        """Subtract sigma_ell^2 from every squared singular value of the buffer.

        ``shrink="svd"`` (default): LAPACK SVD of the buffer. ``shrink="gram"``: the same
        decomposition from the exact symmetric eigensolver on the small m x m Gram matrix (about
        4x faster on CPU for m << D; deterministic, never randomized)."""
        ell = self.sketch_size
        if self._filled <= ell - 1:
            return
        buf = self._buf[: self._filled]
        if self.shrink == "gram":
            # B_new = diag(sqrt(1 - delta / lambda_i)) U^T B: a contraction of B, so
            # B^T B - B_new^T B_new stays PSD with norm delta whatever the rounding in U
            sq, u = _gram_shrink_factors(buf, self._orth_sq)
        else:
            s, vh = _wide_svd(buf)
            sq = s.pow(2)
        # with dim <= ell the sketch can hold the whole row space: no shrink, exact
        delta = float(sq[ell - 1]) if sq.shape[0] >= ell and self.dim > ell else 0.0
        keep = min(ell - 1, sq.shape[0]) if delta > 0 else min(ell, sq.shape[0])
        if self.shrink == "gram":
            lam = sq[:keep]
            scale = torch.where(
                lam > 0, torch.sqrt((1.0 - delta / lam.clamp_min(1e-300)).clamp_min(0.0)), 0.0
            )
            new_rows = (u[:, :keep] * scale.unsqueeze(0)).T @ buf
        else:
            new_rows = (sq[:keep] - delta).clamp_min(0.0).sqrt().unsqueeze(1) * vh[:keep]
        self._buf.zero_()
        self._buf[:keep] = new_rows
        self._filled = keep
        # the kept rows are mutually orthogonal with squared norms s_i^2 - delta
        self._orth_sq = (sq[:keep] - delta).clamp_min(0.0) if self.shrink == "gram" else None
        self.delta += delta
        self.n_shrinks += 1

    def merge(self, other: FrequentDirections) -> FrequentDirections:
        """Fold ``other`` (same dim and sketch size, any device) into this sketch."""
        if not isinstance(other, FrequentDirections):
            raise UsageError("can only merge a FrequentDirections sketch with another one")
        if other.dim != self.dim or other.sketch_size != self.sketch_size:
            raise UsageError(
                f"cannot merge sketches of shape {other.sketch_size}x{other.dim} into "
                f"{self.sketch_size}x{self.dim}",
                "build every shard's sketch with the same dim and sketch_size",
            )
        rows = other._buf[: other._filled].to(device=self.device, dtype=self.dtype)
        self.delta += other.delta
        self.frobenius_sq += other.frobenius_sq
        self.n_rows += other.n_rows
        self.n_shrinks += other.n_shrinks
        self._push(rows)
        return self

    # ------------------------------------------------------------------ results
    @property
    def sketch(self) -> Tensor:
        """The (sketch_size x dim) sketch ``B`` (compressing the buffer first if needed)."""
        if self._filled > self.sketch_size:
            self._shrink()
        out = torch.zeros(self.sketch_size, self.dim, device=self.device, dtype=self.dtype)
        out[: self._filled] = self._buf[: self._filled]
        return out

    def covariance_error_bound(
        self, k: int | None = None, tail_frobenius_sq: float | None = None
    ) -> float:
        """Certified bound on ``||A^T A - B^T B||_2``.

        Without arguments: the tracked total shrinkage ``delta`` (a-posteriori, always valid).
        With ``k`` and ``tail_frobenius_sq = ||A - A_k||_F^2``: the a-priori bound
        ``tail / (ell - k)``, which ``delta`` never exceeds.
        """
        if k is None:
            return self.delta
        if not 0 <= k < self.sketch_size:
            raise UsageError(f"k must lie in [0, {self.sketch_size - 1}], got {k}")
        if tail_frobenius_sq is None:
            raise UsageError("the a-priori bound needs tail_frobenius_sq = ||A - A_k||_F^2")
        return float(tail_frobenius_sq) / (self.sketch_size - k)

    def singular_values(self) -> Tensor:
        """All ``sketch_size`` singular values of ``B`` (descending, zero-padded)."""
        s = torch.linalg.svdvals(self.sketch)
        return s

    def right_singular(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k singular values (k,) and right singular vectors V (dim x k) of the sketch."""
        limit = min(self.sketch_size, self.dim)
        if not 1 <= k <= limit:
            raise NumericalError(
                f"cannot take {k} singular directions from a sketch of size "
                f"{self.sketch_size} x {self.dim}",
                f"use k <= {limit} or a larger sketch_size",
            )
        s, vh = _wide_svd(self.sketch)
        return s[:k].clone(), vh[:k].T.contiguous()

    def state_nbytes(self) -> int:
        """Bytes held by the sketch's working buffer."""
        return self._buf.numel() * self._buf.element_size()


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


# ----------------------------------------------------------------------------- across ranks (issue 15)


@dataclass(frozen=True)
class SketchMerge:
    """What a cross-rank merge did: rounds of the reduction tree, the payload one rank sends
    (its sketch_size x dim sketch plus five statistics), the total over all ranks, and the
    merged sketch's certified covariance error bound (every shard's shrinkage plus the merge's
    own; valid for the concatenated stream)."""

    world_size: int
    rounds: int
    bytes_per_rank: int
    bytes_total: int
    covariance_error_bound: float
    n_rows: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def _sketch_stats(fd: FrequentDirections) -> Tensor:
    return torch.tensor(
        [fd.delta, fd.frobenius_sq, float(fd.n_rows), float(fd.n_shrinks), float(fd._filled)],
        dtype=torch.float64,
    )


def _absorb(fd: FrequentDirections, rows: Tensor, stats: Tensor) -> None:
    """Fold a peer's sketch rows and its statistics (as sent by `_sketch_stats`) into ``fd``."""
    delta, frob, n_rows, n_shrinks, filled = (float(v) for v in stats)
    fd.delta += delta
    fd.frobenius_sq += frob
    fd.n_rows += int(n_rows)
    fd.n_shrinks += int(n_shrinks)
    fd._push(rows[: int(filled)].to(device=fd.device, dtype=fd.dtype))


def merge_across_ranks(
    fd: FrequentDirections, dist: Distributed, root: int = 0
) -> tuple[FrequentDirections | None, SketchMerge]:
    """Merge every rank's frequent-directions sketch onto ``root`` (stack + shrink).

    A binary reduction tree: in round j, rank r with r mod 2^(j+1) == 2^j (relative to root)
    sends its (sketch_size x dim) sketch to rank r - 2^j and leaves, so each rank sends its
    sketch once (sketch_size x dim x itemsize bytes) and the root merges log2(world) times.
    Returns the merged sketch on ``root`` (None elsewhere) and the merge statistics (bound and
    row count are broadcast, so every rank reports the same numbers).
    ``fd`` itself is consumed on ranks that send. World 1: ``fd`` is returned unchanged."""
    world, rank = dist.world_size, dist.rank
    if world == 1:
        return fd, SketchMerge(1, 0, 0, 0, fd.delta, fd.n_rows)
    rel = (rank - root) % world
    rows = fd.sketch  # shrinks to at most sketch_size rows first
    alive: FrequentDirections | None = fd
    step, rounds = 1, 0
    while step < world:
        rounds += 1
        if alive is not None:
            if rel % (2 * step) == step:
                dst = (rel - step + root) % world
                dist.send(_sketch_stats(alive), dst)
                dist.send(rows, dst)
                alive = None
            elif rel % (2 * step) == 0 and rel + step < world:
                src = (rel + step + root) % world
                peer_stats = dist.recv_like(_sketch_stats(alive), src)
                peer_rows = dist.recv_like(rows, src)
                _absorb(alive, peer_rows, peer_stats)
                rows = alive.sketch
        step *= 2
    summary = torch.tensor(
        [alive.delta, float(alive.n_rows)] if alive is not None else [0.0, 0.0],
        dtype=torch.float64,
    )
    summary = dist.broadcast(summary, src=root, device=torch.device("cpu"))
    per_rank = (rows.numel() + 5) * rows.element_size()
    merge = SketchMerge(
        world_size=world,
        rounds=rounds,
        bytes_per_rank=per_rank,
        bytes_total=per_rank * (world - 1),
        covariance_error_bound=float(summary[0]),
        n_rows=int(summary[1]),
    )
    return (alive if rank == root else None), merge
