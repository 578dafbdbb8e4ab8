"""Split ``n`` items into contiguous, disjoint, rank-ordered blocks (no torch needed)."""

from __future__ import annotations

from odekit.errors import UsageError


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block [start, stop) of ``n`` items for ``rank``: sizes differ by at most one,
    blocks are disjoint and in rank order, and together they are exactly range(n)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside 0..{world_size - 1}")
    if n < 0:
        raise UsageError(f"cannot shard {n} items")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The indices of `shard_bounds` as a range."""
    return range(*shard_bounds(n, rank, world_size))
