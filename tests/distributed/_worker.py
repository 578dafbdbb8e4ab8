"""One rank of a multi-process test run (started by tests/distributed with torchrun's variables).

``python _worker.py <scenario> <out_dir>``; rank 0 writes ``<out_dir>/result.pt``.
Scenarios: ``merge`` (sketch merge, least squares, PCE fit, broadcasts), ``fault`` (rank 1
fails while rank 0 waits in a collective), ``crash`` (rank 1 dies without a word).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from odekit.distributed import PeerFailedError, init_distributed
from odekit.errors import NumericalError, OdekitError
from odekit.linalg.sketch import FrequentDirections, merge_across_ranks
from odekit.methods.pce import PCELayer, fit_pce

N, D, ELL, BATCH = 600, 40, 12, 50


def test_matrix() -> torch.Tensor:
    """Rows with a decaying spectrum, the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.logspace(0, -2, D - 3)]).double()
    return torch.randn(N, D, generator=gen, dtype=torch.float64) * scales


def regression(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = (z[:, :1] ** 2 - z[:, 1:2] * z[:, 2:3] + 0.1 * torch.randn(n, 1, generator=gen, dtype=torch.float64))
    return z, y


def merge(dist, out: Path) -> None:
    a = test_matrix()
    mine = a[dist.shard(N).start : dist.shard(N).stop]
    fd = FrequentDirections(D, ELL)
    for i in range(0, mine.shape[0], BATCH):
        fd.update(mine[i : i + BATCH])
    merged, info = merge_across_ranks(fd, dist)
    # least squares from all-reduced normal equations
    z, y = regression(N)
    zs, ys = z[dist.shard(N).start : dist.shard(N).stop], y[dist.shard(N).start : dist.shard(N).stop]
    x = torch.cat([zs, torch.ones(zs.shape[0], 1, dtype=torch.float64)], 1)
    gram, rhs = dist.all_reduce_sum(x.T @ x), dist.all_reduce_sum(x.T @ ys)
    coef = torch.linalg.solve(gram, rhs)
    layer = PCELayer(3, 2, 1).double()
    fit = fit_pce(layer, [(zs, ys)], dist=dist)
    count, total = dist.sum_numbers(zs.shape[0], float(ys.sum()))
    # rank 0 picks, everyone receives
    picked = dist.broadcast(torch.arange(5) * 7 if dist.is_main else None)
    ranks = dist.broadcast_object({"ranks": [3, 1]} if dist.is_main else None)
    if dist.is_main:
        assert merged is not None
        torch.save(
            {
                "sketch": merged.sketch,
                "delta": merged.delta,
                "n_rows": merged.n_rows,
                "frobenius_sq": merged.frobenius_sq,
                "merge": info.to_dict(),
                "coef": coef,
                "pce": layer.linear.weight.detach().clone(),
                "pce_samples": fit.n_samples,
                "count": count,
                "mean": total / count,
                "picked": picked,
                "ranks": ranks,
                "world": dist.world_size,
            },
            out / "result.pt",
        )


def fault(dist, out: Path) -> None:
    if dist.rank == 1:
        time.sleep(0.5)
        raise NumericalError("injected fault on purpose", "this is a test")
    # rank 0 waits for a peer that never comes: only the abort can end this
    dist.all_reduce_sum(torch.ones(3))
    (out / "rank0-finished").write_text("should not happen")


def crash(dist, out: Path) -> None:
    if dist.rank == 1:
        time.sleep(0.5)
        os._exit(3)
    dist.all_reduce_sum(torch.ones(3))
    (out / "rank0-finished").write_text("should not happen")


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist = init_distributed(torch.device("cpu"), stale_s=float(os.environ.get("STALE_S", "20")))
    dist.add_cleanup(lambda: (out / f"cleanup-{dist.rank}").write_text("forced"))
    try:
        {"merge": merge, "fault": fault, "crash": crash}[scenario](dist, out)
        dist.close()
    except PeerFailedError:
        dist.exit_after_failure(1)
    except OdekitError as exc:
        dist.fail(exc.one_line())
        print(f"Error: rank {dist.rank}: {exc.one_line()}", file=sys.stderr)
        dist.exit_after_failure(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
