"""RON (`odekit reduce`) benchmark: accuracy/FLOP/latency trade-off and streaming-SVD scale.

    .venv/bin/python benchmarks/reduce.py --quick          # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/reduce.py                  # more ranks, N = 50,000 scale case
    .venv/bin/python benchmarks/reduce.py --only scale     # one part only (tradeoff | scale)

Cases, each one JSON line (stdout and benchmarks/results/reduce.jsonl):
- "tradeoff": RON on the shipped digits checkpoints (LeNet-300-100, VGG-11/4) for several layer
  ranges and ranks: FLOPs (2 x MACs per sample), FLOP reduction, accuracy before/after
  fine-tuning, measured CPU latency (batches of 256 test inputs; teacher and student timed in 5
  alternating rounds of warm-up + 10 batches, medians) and the
  ratio latency speedup / FLOP reduction. Goal: LeNet-300-100 >= 4x FLOPs with <= 1 point drop
  after fine-tuning, and latency speedup >= 0.7 x FLOP reduction.
- "scale": layer outputs of a CIFAR-shaped VGG-19 (3 x 32 x 32 inputs; width 1/4 so that the
  2nd conv block output has D = 16 x 32 x 32 = 16384 and N = 50,000 forward passes fit in
  minutes on 2 cores). Inputs are seeded 1/f ("natural image like") random fields. Our streaming
  frequent-directions SVD (held: sketch only) vs scikit-learn randomized_svd and
  torch.linalg.svd on the materialised N x D matrix: wall time, rows/s, peak RSS increase
  (sampled), bytes held, principal-angle error sin(theta) of the top-R subspace against an
  exact SVD (float64) of a subset (``--exact-rows``), on which every method is also run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from measure import (  # benchmarks/measure.py (the script folder is on sys.path)
    PeakRSS,
    emit_line,
    results_path,
)

from odekit.io.checkpoints import load_model
from odekit.io.datasets import dataset_for_model
from odekit.linalg import StreamingSVD, subspace_sin_theta
from odekit.methods.evaluation import accuracy, measure_latency_ms, model_cost
from odekit.methods.ron import RonSettings, build_student
from odekit.methods.training import TrainSettings, train_classifier
from odekit.models.registry import build_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = results_path("reduce")
CKPT = ROOT / "checkpoints"


def paired_latency_ms(
    teacher: torch.nn.Module, student: torch.nn.Module, example: torch.Tensor, rounds: int = 5
) -> tuple[float, float]:
    """Median latencies measured in alternating rounds (each: warm-up + 10 timed batches), so
    that load changes on shared cores hit teacher and student alike."""
    device = torch.device("cpu")
    t_runs, s_runs = [], []
    for _ in range(rounds):
        t_runs.append(measure_latency_ms(teacher, example, device, warmup=3, repeats=10))
        s_runs.append(measure_latency_ms(student, example, device, warmup=3, repeats=10))
    return statistics.median(t_runs), statistics.median(s_runs)


def emit(record: dict[str, Any]) -> None:
    emit_line(RESULTS, json.dumps(record, default=lambda v: float(v) if isinstance(v, torch.Tensor) else str(v)))


# --------------------------------------------------------------------------- trade-off


def tradeoff(quick: bool, finetune_epochs: int) -> None:
    cases = [
        ("lenet300_digits", "1-3", "40,40,10"),
        ("lenet300_digits", "1-3", "30,30,10"),
        ("lenet300_digits", "1-3", "vbmf"),
        ("lenet300_digits", "1-2", "40,40"),
        ("vgg11_digits", "5-8", "24"),
        ("vgg11_digits", "3-8", "vbmf"),
    ]
    if not quick:
        cases += [
            ("lenet300_digits", "1-3", "20,20,10"),
            ("lenet300_digits", "1-3", "energy:0.99"),
            ("vgg11_digits", "7-8", "16"),
            ("vgg11_digits", "5-8", "vbmf"),
        ]
    device = torch.device("cpu")
    cache: dict[str, Any] = {}
    for name, layers, rank in cases:
        if name not in cache:
            loaded = load_model(CKPT / f"{name}.safetensors")
            data = dataset_for_model(
                loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset
            )
            shape = tuple(loaded.meta.input_shape)
            example = data.test.x[:256]
            teacher = loaded.model.eval()
            cache[name] = (
                loaded,
                data,
                shape,
                example,
                accuracy(teacher, data.test),
                model_cost(teacher, shape),
            )
        loaded, data, shape, example, t_acc, t_cost = cache[name]
        start = time.perf_counter()
        res = build_student(
            loaded.model,
            loaded.meta.arch,
            loaded.meta.args,
            shape,
            data.train.x,
            RonSettings(layers=layers, rank=rank),
        )
        build_s = time.perf_counter() - start
        student = res.student.eval()
        acc0 = accuracy(student, data.test)
        _, lat0 = paired_latency_ms(loaded.model, student, example, rounds=3)
        cost = model_cost(student, shape)
        epochs = finetune_epochs if "lenet" in name else max(1, finetune_epochs // 2)
        lr = 1e-3 if "lenet" in name else 3e-4
        settings = TrainSettings(epochs=epochs, lr=lr, batch_size=64, beta=0.5, seed=0)
        train_classifier(student, data, settings, device, teacher=loaded.model,
                         bn_layers=student.changed_batchnorms(), grad_masks=student.structural_masks())  # fmt: skip
        student.eval()
        acc1 = accuracy(student, data.test)
        t_lat, lat1 = paired_latency_ms(loaded.model, student, example)
        red = t_cost.flops / cost.flops
        speed = t_lat / lat1
        emit(
            {
                "case": "tradeoff",
                "model": name,
                "layers": layers,
                "rank_rule": rank,
                "ranks": res.ranks,
                "rows": [layer.rows for layer in res.layers],
                "teacher_accuracy": t_acc,
                "student_accuracy_before_finetune": acc0,
                "student_accuracy_after_finetune": acc1,
                "finetune_epochs": epochs,
                "finetune_lr": lr,
                "accuracy_drop_points_before": 100 * (t_acc - acc0),
                "accuracy_drop_points_after": 100 * (t_acc - acc1),
                "teacher_flops": t_cost.flops,
                "student_flops": cost.flops,
                "flop_reduction": red,
                "param_reduction": t_cost.params / cost.params,
                "teacher_latency_ms_b256": t_lat,
                "student_latency_ms_b256": lat1,
                "student_latency_ms_b256_before_finetune": lat0,
                "latency_speedup": speed,
                "speedup_over_flop_reduction": speed / red,
                "eq520_factors": [round(layer.error_factor, 3) for layer in res.layers],
                "build_seconds": build_s,
                "threads": torch.get_num_threads(),
                "flops_convention": "2 x multiply-adds per sample",
            }
        )


# --------------------------------------------------------------------------- scale


_DIGITS: torch.Tensor | None = None


def _cifar_shaped_inputs(n: int, seed: int) -> torch.Tensor:
    """Seeded CIFAR-shaped (3 x 32 x 32) inputs generated in-process from the shipped digits:
    random image, shift of up to 3 pixels, per-channel colour scale, additive noise."""
    global _DIGITS
    if _DIGITS is None:
        from odekit.io.datasets import load_dataset

        ds = load_dataset("digits", input_shape=(1, 32, 32))
        _DIGITS = torch.cat([ds.train.x, ds.test.x])
    g = torch.Generator().manual_seed(seed)
    x = _DIGITS[torch.randint(0, _DIGITS.shape[0], (n,), generator=g)]
    shift = torch.randint(-3, 4, (2,), generator=g)
    x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.8 + 0.6
    return x * colour + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def _layer_stream(n: int, batch: int, seed: int):
    """Yields (B, 16384) outputs of conv block 1 (conv-BN-ReLU x 2) of a width-1/4 CIFAR VGG-19."""
    torch.manual_seed(seed)
    model = build_model("vgg19_bn", {"num_classes": 10, "width": 0.25}).eval()
    head = model.features[:6]  # conv1-bn-relu-conv2-bn-relu: 16 x 32 x 32 = 16384
    with torch.no_grad():
        for start in range(0, n, batch):
            x = _cifar_shaped_inputs(min(batch, n - start), seed * 100_003 + start)
            yield head(x).reshape(x.shape[0], -1)


def _exact_top(z: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-r right singular pairs of a wide subset (rows <= D): float64 symmetric
    eigensolver on Z Z^T, V = Z^T U / s."""
    z64 = z.double()
    evals, evecs = torch.linalg.eigh(z64 @ z64.T)
    s = evals.flip(0)[:r].clamp_min(0).sqrt()
    u = evecs.flip(1)[:, :r]
    v = (z64.T @ u) / s
    return s, torch.linalg.qr(v).Q * torch.sign(torch.ones(r, dtype=torch.float64))


def scale(
    quick: bool, n: int, rank: int, sketch_sizes: list[int], exact_rows: int, batch: int
) -> None:
    from sklearn.utils.extmath import randomized_svd

    d = 16384
    # 1) one stream over all N inputs, fed to every variant (each update timed alone)
    variants = [("gram", ell) for ell in sketch_sizes] + [("svd", sketch_sizes[0])]
    sketches = {
        f"{mode}-{ell}": StreamingSVD(
            d, rank=rank, sketch_size=ell, dtype=torch.float32, shrink=mode
        )
        for mode, ell in variants
    }
    seconds = dict.fromkeys(sketches, 0.0)
    forward_s = time.perf_counter()
    with PeakRSS() as rss:
        for rows in _layer_stream(n, batch, seed=0):
            for key, sk in sketches.items():
                t = time.perf_counter()
                sk.update(rows)
                seconds[key] += time.perf_counter() - t
    forward_s = time.perf_counter() - forward_s - sum(seconds.values())
    results = {key: sk.result() for key, sk in sketches.items()}

    # 2) the same matrix materialised for the peers (if it fits in 6 GiB)
    rsvd_s = None
    v_rsvd = None
    if n * d * 4 <= 6 * 2**30:
        z_full = torch.cat(list(_layer_stream(n, batch, seed=0)))
        t = time.perf_counter()
        with PeakRSS() as rss_r:
            _, _, vt_r = randomized_svd(z_full.numpy(), n_components=rank, random_state=0)
        rsvd_s = time.perf_counter() - t
        v_rsvd = torch.from_numpy(vt_r.T.copy())
        emit(
            {
                "case": "scale",
                "method": "sklearn randomized_svd (full N x D matrix in memory)",
                "n_rows": n,
                "dim": d,
                "rank": rank,
                "threads": torch.get_num_threads(),
                "seconds": rsvd_s,
                "rows_per_second": n / rsvd_s,
                "peak_rss_increase_mb_during_svd": rss_r.mb,
                "held_mb": z_full.numel() * 4 / 2**20,
            }
        )
        del z_full
    else:
        emit({"case": "scale", "method": "sklearn randomized_svd", "n_rows": n,
              "skipped": f"the {n} x {d} float32 matrix ({n * d * 4 / 2**30:.1f} GiB) is over the 6 GiB budget"})  # fmt: skip
    for key, sk in sketches.items():
        res = results[key]
        emit(
            {
                "case": "scale",
                "method": f"odekit streaming frequent directions (shrink={sk.fd.shrink}, sketch={sk.fd.sketch_size})",
                "n_rows": n,
                "dim": d,
                "rank": rank,
                "sketch_size": sk.fd.sketch_size,
                "dtype": "float32",
                "threads": torch.get_num_threads(),
                "sketch_seconds": seconds[key],
                "forward_seconds": forward_s,
                "rows_per_second_sketch": n / seconds[key],
                "peak_rss_increase_mb_stream_all_sketches": rss.mb,
                "held_mb": sk.fd.state_nbytes() / 2**20,
                "full_matrix_mb": n * d * 4 / 2**20,
                "certified_covariance_error_rel": res.covariance_error
                / float(res.singular_values[0] ** 2),
                "sin_theta_vs_randomized_svd": subspace_sin_theta(v_rsvd, res.V)
                if v_rsvd is not None
                else None,
                "speedup_vs_randomized_svd": rsvd_s / seconds[key] if rsvd_s else None,
            }
        )

    # 3) accuracy against an exact SVD of a subset: every method on the same subset rows
    m = min(exact_rows, n)
    z_sub = torch.cat(list(_layer_stream(m, batch, seed=0)))
    t = time.perf_counter()
    s_ex, v_ex = _exact_top(z_sub, rank)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    _, _, vt_r = randomized_svd(z_sub.numpy(), n_components=rank, random_state=0)
    rs_s = time.perf_counter() - t
    t = time.perf_counter()
    _, _, vh_t = torch.linalg.svd(z_sub, full_matrices=False)
    ts_s = time.perf_counter() - t
    emit(
        {
            "case": "scale_accuracy",
            "method": "peers",
            "subset_rows": m,
            "dim": d,
            "rank": rank,
            "exact": "float64 eigendecomposition of Z Z^T on the subset",
            "exact_seconds": exact_s,
            "sigma_R_over_sigma_1": float(s_ex[-1] / s_ex[0]),
            "sin_theta_randomized_svd": subspace_sin_theta(v_ex, torch.from_numpy(vt_r.T.copy())),
            "seconds_randomized_svd": rs_s,
            "sin_theta_torch_svd_float32": subspace_sin_theta(v_ex, vh_t[:rank].T),
            "seconds_torch_svd_float32": ts_s,
            "torch_svd_full_matrix_estimate_seconds": ts_s * (n / m) ** 2,
            "torch_svd_full_matrix": f"not run at N={n}: cost grows as N^2 D (estimate above)"
            if n > m
            else "run",
        }
    )
    for mode, ell in variants:
        sk = StreamingSVD(d, rank=rank, sketch_size=ell, dtype=torch.float32, shrink=mode)
        t = time.perf_counter()
        for start in range(0, m, batch):
            sk.update(z_sub[start : start + batch])
        res = sk.result()
        secs = time.perf_counter() - t
        err = subspace_sin_theta(v_ex, res.V)
        emit(
            {
                "case": "scale_accuracy",
                "method": f"odekit streaming frequent directions (shrink={mode}, sketch={ell})",
                "subset_rows": m,
                "dim": d,
                "rank": rank,
                "sin_theta_vs_exact": err,
                "certified_sin_bound": res.subspace_error_bound,
                "max_rel_sigma_error": float(
                    ((res.singular_values.double() - s_ex) / s_ex).abs().max()
                ),
                "seconds": secs,
                "within_1e-2": err <= 1e-2,
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer cases, N = 5000 for the scale case"
    )
    parser.add_argument("--only", choices=("tradeoff", "scale"), default=None)
    parser.add_argument(
        "--rows", type=int, default=None, help="N for the scale case [5000 quick, 50000 full]"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--sketch", type=str, default="64,160", help="comma list of FD sketch sizes"
    )
    parser.add_argument("--exact-rows", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--finetune", type=int, default=6)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/BLAS threads (1 avoids spin contention on shared cores)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    n = args.rows or (5000 if args.quick else 50_000)
    if args.only in (None, "tradeoff"):
        tradeoff(args.quick, args.finetune)
    if args.only in (None, "scale"):
        sizes = [int(v) for v in args.sketch.split(",")]
        scale(args.quick, n, args.rank, sizes, args.exact_rows, args.batch)


if __name__ == "__main__":
    main()
