"""Conv spectral-norm bounds: Gram iteration (odekit certify) against the exact norm and plain
power iteration, on the same random layers in one process; and one teacher-vs-student certify.

    .venv/bin/python benchmarks/lipschitz.py --quick      # 16 and 64 channels, small dense cases
    .venv/bin/python benchmarks/lipschitz.py              # 16..256 channels at 32x32
    .venv/bin/python benchmarks/lipschitz.py --compare STUDENT TEACHER [certify options...]

Cases (one JSON line each, stdout and benchmarks/results/lipschitz.jsonl):

* ``fft``: a C -> C 3x3 conv at 32x32 with circular padding. Exact: FFT of the kernel and the
  SVD of every frequency block (Sedghi et al. 2019). Ours: Gram iteration on the same blocks
  (``--iters``). Also the zero-padded layer: our bound on its 34x34 canvas and power iteration
  on the operator (``--power-iters`` steps of conv + adjoint), a lower bound.
  Goal: upper <= 1.05 x exact at <= 1/10 of the exact method's time for 64+ channels.
* ``dense``: small zero-padded / strided / grouped convs whose dense matrix fits in memory:
  exact = SVD of the dense operator, against our [lower, upper].
* ``compare``: `odekit certify STUDENT --compare TEACHER --json` in a subprocess; the
  comparison rows and both networks' bounds.

Timings are single-threaded (torch.set_num_threads(1)) on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from measure import (  # benchmarks/measure.py (the script folder is on sys.path)
    emit_line,
    results_path,
)

from odekit.linalg.lipschitz import (
    ConvSpec,
    circular_conv_norm,
    conv_operator,
    conv_upper_bound,
    dense_conv_matrix,
    power_iteration,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = results_path("lipschitz")


def emit(record: dict[str, Any]) -> None:
    emit_line(RESULTS, json.dumps(record))


def _timed(fn: Any, repeats: int = 1) -> tuple[Any, float]:
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def _kernel(c_out: int, c_in: int, k: int, seed: int, dtype: torch.dtype, groups: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c_out, c_in // groups, k, k, generator=g) * (2.0 / (c_in // groups * k * k)) ** 0.5).to(dtype)


def fft_case(channels: int, size: int, iters: int, power_iters: int, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Circular 3x3 conv: Gram bound vs FFT+SVD; zero-padded: Gram bound vs power iteration."""
    w = _kernel(channels, channels, 3, seed, dtype)
    circular = ConvSpec.of((size, size), 1, 1, padding_mode="circular")
    exact, t_exact = _timed(lambda: circular_conv_norm(w, (size, size)))
    upper, t_upper = _timed(lambda: conv_upper_bound(w, circular, iters, dtype=dtype))
    zeros = ConvSpec.of((size, size), 1, 1)
    upper_zero, t_upper_zero = _timed(lambda: conv_upper_bound(w, zeros, iters, dtype=dtype))
    forward, adjoint = conv_operator(w, zeros)
    start = torch.randn(channels, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    lower, t_power = _timed(lambda: power_iteration(forward, adjoint, start, power_iters))
    return {
        "case": "fft", "channels": channels, "size": size, "kernel": 3, "dtype": str(dtype).replace("torch.", ""),
        "iters": iters, "exact_circular": exact, "gram_circular": upper, "tightness": upper / exact,
        "seconds_exact_fft_svd": t_exact, "seconds_gram": t_upper, "time_ratio_gram_over_exact": t_upper / t_exact,
        "zero_padding": {"gram_upper": upper_zero, "power_lower": lower, "upper_over_lower": upper_zero / lower,
                         "seconds_gram": t_upper_zero, "seconds_power": t_power, "power_iters": power_iters},
        "goal_tightness_1.05": upper / exact <= 1.05, "goal_time_0.1": t_upper / t_exact <= 0.1,
    }  # fmt: skip


DENSE = [  # c_out, c_in, n, stride, padding, dilation, groups
    (4, 4, 8, 1, 1, 1, 1),
    (8, 8, 8, 1, 1, 1, 1),
    (8, 8, 8, 2, 1, 1, 1),
    (8, 8, 8, 1, 2, 2, 1),
    (8, 8, 8, 1, 1, 1, 4),
    (16, 16, 8, 1, 1, 1, 1),
    (16, 16, 12, 2, 1, 1, 2),
]


def dense_case(case: tuple[int, ...], iters: int, power_iters: int, seed: int) -> dict[str, Any]:
    """A small zero-padded conv: exact from the dense operator's SVD."""
    c_out, c_in, n, s, p, d, g = case
    w = _kernel(c_out, c_in, 3, seed, torch.float64, g)
    spec = ConvSpec.of((n, n), s, p, d, g)
    exact, t_exact = _timed(lambda: float(torch.linalg.matrix_norm(dense_conv_matrix(w, spec), 2)))
    upper, t_upper = _timed(lambda: conv_upper_bound(w, spec, iters))
    forward, adjoint = conv_operator(w, spec)
    start = torch.randn(c_in, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lower, t_power = _timed(lambda: power_iteration(forward, adjoint, start, power_iters))
    return {"case": "dense", "c_out": c_out, "c_in": c_in, "size": n, "stride": s, "padding": p, "dilation": d,
            "groups": g, "exact_dense_svd": exact, "gram_upper": upper, "power_lower": lower,
            "tightness": upper / exact, "power_over_exact": lower / exact, "seconds_dense_svd": t_exact,
            "seconds_gram": t_upper, "seconds_power": t_power, "sound": lower <= exact * (1 + 1e-9) <= upper}  # fmt: skip


def compare_case(student: str, teacher: str, extra: list[str]) -> dict[str, Any]:
    """`odekit certify STUDENT --compare TEACHER` as a user runs it; its comparison rows."""
    out = tempfile.mkdtemp(prefix="odekit-bench-certify-")
    cmd = [sys.executable, "-m", "odekit", "certify", student, "--compare", teacher, "--json", "--threads", "1",
           "-o", out, "--force", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ODEKIT_PROGRESS": "off"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    results = json.loads(done.stdout)["results"]
    return {"case": "compare", "student": student, "teacher": teacher, "options": extra,
            "wall_seconds": time.perf_counter() - start, "rows": results["comparison"]["rows"],
            "samples": results["comparison"]["samples"],
            "student_layers": [[x["index"], x["lipschitz_lower"], x["lipschitz_upper"]] for x in results["layers"]
                               if x["index"] is not None],
            "teacher_layers": [[x["index"], x["lipschitz_lower"], x["lipschitz_upper"]]
                               for x in results["teacher"]["layers"] if x["index"] is not None]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 and 64 channels, four dense cases")
    parser.add_argument("--channels", default=None, help="comma-separated channel counts [16,32,64,128,256]")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--power-iters", type=int, default=50)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", nargs=2, metavar=("STUDENT", "TEACHER"), default=None)
    args, extra = parser.parse_known_args()
    torch.set_num_threads(1)
    if args.compare:
        emit(compare_case(args.compare[0], args.compare[1], extra))
        return
    if extra:
        parser.error(f"unknown options {extra} (certify options go with --compare)")
    channels = [int(c) for c in (args.channels or ("16,64" if args.quick else "16,32,64,128,256")).split(",")]
    for case in DENSE[:4] if args.quick else DENSE:
        emit(dense_case(case, args.iters, args.power_iters, args.seed))
    for c in channels:
        emit(fft_case(c, args.size, args.iters, args.power_iters, getattr(torch, args.dtype), args.seed))


if __name__ == "__main__":
    main()
