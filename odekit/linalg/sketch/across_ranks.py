"""Merge every rank's frequent-directions sketch onto one rank with a binary reduction tree
(issue 15)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from odekit.distributed import Distributed
from odekit.linalg.sketch.frequent_directions import FrequentDirections


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
