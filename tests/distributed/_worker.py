"""One rank of a multi-process test run (started by tests/distributed with torchrun's variables).

``python _worker.py <scenario> <out_dir>``; rank 0 writes ``<out_dir>/result.pt``.
Scenarios: ``merge`` (sketch merge, least squares, PCE fit, broadcasts), ``fault`` (rank 1
fails while rank 0 waits in a collective), ``crash`` (rank 1 dies without a word), ``attack``
(active-subspace and random universal attacks on lenet300_digits), ``channel`` (``reduce --mode
channel`` on a small conv net with BatchNorms; every rank writes ``result-<rank>.pt``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from odekit.distributed import PeerFailedError, init_distributed
from odekit.errors import NumericalError, OdekitError
from odekit.linalg.active import dominant_direction_across_ranks
from odekit.linalg.sketch import FrequentDirections, merge_across_ranks
from odekit.methods.pce import PCELayer, fit_pce

N, D, ELL, BATCH = 600, 40, 12, 50
ROOT = Path(__file__).resolve().parents[2]


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
    # gradients split between the first and the last rank (any rank between holds none)
    half = N // 2
    last = dist.world_size - 1
    grads = a[:half] if dist.rank == 0 else a[half:] if dist.rank == last else a[:0]
    direction = dominant_direction_across_ranks(grads, dist)
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
                "direction": direction,
                "ranks": ranks,
                "world": dist.world_size,
            },
            out / "result.pt",
        )


def ron_student(dist, samples: int = 600):
    """RON on the shipped LeNet-300-100, layers 1-2, from the first ``samples`` training
    inputs (sharded over the ranks when ``dist`` has several)."""
    from odekit.io.checkpoints import load_model
    from odekit.io.datasets import dataset_for_model
    from odekit.methods.ron import RonSettings, build_student

    loaded = load_model(ROOT / "checkpoints" / "lenet300_digits.safetensors")
    data = dataset_for_model(
        loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset
    )
    settings = RonSettings(layers="1-2", rank="32,24", sketch_size=64, batch_size=100)
    result = build_student(
        loaded.model, loaded.meta.arch, loaded.meta.args, data.input_shape,
        data.train.x[:samples], settings, dist=dist,
    )
    with torch.no_grad():
        predictions = result.student.eval()(data.test.x).argmax(1)
    return result, predictions


def ron(dist, out: Path) -> None:
    result, predictions = ron_student(dist)
    if dist.is_main:
        torch.save(
            {
                "predictions": predictions,
                "ranks": result.ranks,
                "n_samples": result.n_samples,
                "covariance_error": [layer.covariance_error for layer in result.layers],
                "merge_bounds": [m.covariance_error_bound for m in result.merges],
                "stream_samples": result.throughput.samples if result.throughput else -1,
            },
            out / "result.pt",
        )


CHANNEL_SHAPE, CHANNEL_FIT, CHANNEL_VAL, CHANNEL_BATCH = (3, 8, 8), 96, 40, 24


def channel_net() -> torch.nn.Module:
    """Conv/BN/ReLU x 2, max-pool, flatten, linear: seeded, BatchNorm statistics from a few batches."""
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 5),
    )  # fmt: skip
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, *CHANNEL_SHAPE, generator=gen))
    return net.eval()


def channel_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Fitting and validation images (the same on every rank) and a test probe."""
    x = torch.randn(CHANNEL_FIT + CHANNEL_VAL + 16, *CHANNEL_SHAPE, generator=torch.Generator().manual_seed(2))
    return x[: CHANNEL_FIT + CHANNEL_VAL], x[CHANNEL_FIT + CHANNEL_VAL :]


def channel_students(dist) -> dict:
    """The channel student at half the FLOPs (sensitivities, greedy vs uniform by validation KL,
    BatchNorm recalibration) and with the rank rule's widths, and their outputs on a probe."""
    from odekit.io.datasets import Split
    from odekit.methods.ron.channel_build import build_channel_student
    from odekit.methods.ron.settings import RonSettings

    x, probe = channel_inputs()
    y = torch.zeros(len(x), dtype=torch.long)
    fit, val = Split(x[:CHANNEL_FIT], y[:CHANNEL_FIT]), Split(x[CHANNEL_FIT:], y[CHANNEL_FIT:])
    result = {}
    for name, settings in (
        ("budget", RonSettings(mode="channel", target_flops=0.5, batch_size=CHANNEL_BATCH)),
        ("rank", RonSettings(mode="channel", rank="energy:0.9", batch_size=CHANNEL_BATCH)),
    ):
        built = build_channel_student(channel_net(), CHANNEL_SHAPE, fit, val, settings, torch.device("cpu"), dist=dist)
        with torch.no_grad():
            out = built.student.eval()(probe)
        result[name] = {"widths": built.widths, "out": out, "distributed": built.distributed,
                        "candidates": built.budget.get("candidates", [])}  # fmt: skip
    return result


def channel(dist, out: Path) -> None:
    torch.save(channel_students(dist), out / f"result-{dist.rank}.pt")


def attack(dist, out: Path) -> None:
    """Active-subspace and random universal attacks fitted on a sharded fit set, FGSM on a
    sharded test split, every score from a sharded test split (issue 15)."""
    from odekit.io.checkpoints import load_model
    from odekit.io.datasets import dataset_for_model
    from odekit.methods.attacks import ActiveSubspaceAttack, ActiveSubspaceSettings, RandomAttack
    from odekit.methods.attacks.base import UniversalSettings
    from odekit.methods.attacks.evaluate import evaluate_adversarial, evaluate_universal
    from odekit.methods.attacks.experiments import eval_inputs, fit_inputs
    from odekit.methods.attacks.per_sample import FGSMAttack, FGSMSettings
    from odekit.methods.attacks.space import pixel_model

    loaded = load_model(ROOT / "checkpoints" / "lenet300_digits.safetensors")
    data = dataset_for_model(loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset)
    model = pixel_model(loaded.model, data)
    x_fit = fit_inputs(data, 301, seed=0)  # odd: the shards differ in size
    x_test, y_test = eval_inputs(data, 251, 0, torch.device("cpu"))
    handle = dist if dist.world_size > 1 else None
    as_fit = ActiveSubspaceAttack(ActiveSubspaceSettings(delta=3.0, max_iter=4))(
        model, x_fit, None, 3.0, batch_size=64, dist=handle
    )
    direction = ActiveSubspaceAttack(ActiveSubspaceSettings(delta=3.0, max_iter=1))(
        model, x_fit, None, 3.0, batch_size=64, dist=handle
    )
    rnd = RandomAttack(UniversalSettings(delta=3.0))(model, x_fit, None, 3.0, seed=5, dist=handle)
    scores = {name: evaluate_universal(model, x_test, y_test, r.v, 64, None, handle)
              for name, r in (("as", as_fit), ("random", rnd))}  # fmt: skip
    # per-sample: each rank attacks its shard of the test inputs, the call gathers x_adv
    fgsm = FGSMAttack(FGSMSettings(norm="inf"))(model, x_test, y_test, 0.1, batch_size=64, dist=handle)
    scores["fgsm"] = evaluate_adversarial(model, x_test, y_test, fgsm.x_adv, 64, None, handle)
    if dist.is_main:
        torch.save({"v_as": as_fit.v, "v_first": direction.v, "v_random": rnd.v,
                    "fit_as": as_fit.fooling_rate_fit, "fit_random": rnd.fooling_rate_fit,
                    "history_as": as_fit.history, "scores": scores, "x_adv_fgsm": fgsm.x_adv,
                    "sizes_fgsm": fgsm.sizes}, out / "result.pt")  # fmt: skip


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
    device = torch.device(os.environ.get("WORKER_DEVICE", "cpu"))
    dist = init_distributed(device, stale_s=float(os.environ.get("STALE_S", "20")))
    dist.add_cleanup(lambda: (out / f"cleanup-{dist.rank}").write_text("forced"))
    try:
        {"merge": merge, "ron": ron, "attack": attack, "channel": channel, "fault": fault, "crash": crash}[scenario](dist, out)
        dist.close()
    except PeerFailedError:
        dist.exit_after_failure(1)
    except Exception as exc:
        line = exc.one_line() if isinstance(exc, OdekitError) else f"{type(exc).__name__}: {exc}"
        dist.fail(line)
        print(f"Error: rank {dist.rank}: {line}", file=sys.stderr)
        dist.exit_after_failure(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
