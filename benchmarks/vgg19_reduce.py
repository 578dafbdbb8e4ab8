"""The design card's command at full size: `odekit reduce vgg19.pt --layers 7-16` on a user's VGG-19.

    .venv/bin/python benchmarks/vgg19_reduce.py --quick    # width 1/8, 3 epochs: a few minutes
    .venv/bin/python benchmarks/vgg19_reduce.py            # full width, as the issue asks

A user's kuangliu-style VGG-19 (biased convs + BatchNorm, `out.view(out.size(0), -1)` forward;
the class is ``tests/foreign/zoo.py`` copied into the run folder as ``myvgg.py``, which odekit
never imports by name) is trained on digits upsampled to 3x32x32 (seeded, CPU, raw [0, 1] pixels),
saved as a trusted pickle ``vgg19.pt`` and as ``vgg19.pt2`` (torch.export), and then reduced by
the CLI as a user would run it, in a subprocess:

    odekit reduce vgg19.pt  --trust-checkpoint --mode region --layers 7-16 --data digits32.npz --normalize none --finetune 0
    odekit reduce vgg19.pt2                    --mode region --layers 7-16 --data digits32.npz --normalize none --finetune 1

Each run is one JSON line (stdout and benchmarks/results/vgg19_reduce.jsonl): FLOP and parameter
reduction, top-1 agreement, accuracy drop before/after 1 fine-tuning epoch, latency speed-up
(teacher and student timed interleaved by odekit), wall time and peak RSS of the CLI process
(os.wait4), and the load average. Goals (thesis table 5.1: 1.53x at +0.09 points on CIFAR-10):
>= 1.5x FLOPs at <= 0.5 points drop without fine-tuning, latency speed-up >= 0.7 x FLOP ratio,
wall time <= 3 min and peak RSS <= 3 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from measure import (  # benchmarks/measure.py (the script folder is on sys.path)
    emit_line,
    results_path,
)

from odekit.io.datasets import load_dataset

ROOT = Path(__file__).resolve().parent.parent
RESULTS = results_path("vgg19_reduce")
USER_CODE = ROOT / "tests" / "foreign" / "zoo.py"


def emit(record: dict[str, Any]) -> None:
    emit_line(RESULTS, json.dumps(record))


def write_data(folder: Path, train_samples: int | None) -> Any:
    """Digits at 3x32x32 in [0, 1] pixels with odekit's fixed split, as a user's .npz."""
    data = load_dataset("digits", input_shape=(3, 32, 32), normalization={"mean": [0.0], "std": [1.0]})
    train = data.train.subset(train_samples, seed=0)
    path = folder / "digits32.npz"
    np.savez(path, x=train.x.numpy(), y=train.y.numpy(), x_test=data.test.x.numpy(), y_test=data.test.y.numpy())
    return data


def train_user_vgg(folder: Path, data: Any, width_div: int, epochs: int, train_samples: int | None) -> dict[str, Any]:
    """Build the user's VGG-19 from myvgg.py, train it (Adam, one-cycle, seeded) and save it two ways."""
    shutil.copyfile(USER_CODE, folder / "myvgg.py")
    sys.path.insert(0, str(folder))
    try:
        myvgg = importlib.import_module("myvgg")
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    model = myvgg.KuangliuVGG("VGG19", num_classes=10, width_div=width_div)
    train = data.train.subset(train_samples, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(train) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in train.batches(64, shuffle=True, generator=generator):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    train_s = time.perf_counter() - start
    with torch.no_grad():
        acc = float(sum((model(x).argmax(1) == y).sum() for x, y in data.test.batches(256)) / len(data.test))
    torch.save(model, folder / "vgg19.pt")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "vgg19.pt2"))
    sys.modules.pop("myvgg", None)  # odekit must find the class on its own
    return {"teacher_accuracy_plain_torch": acc, "train_seconds": train_s,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def reuse_trained(folder: Path, data: Any) -> dict[str, Any]:
    """Teacher numbers of a previous run's vgg19.pt2 (its training time is not re-measured)."""
    from odekit.io.exported import load_exported

    model, _ = load_exported(folder / "vgg19.pt2")
    with torch.no_grad():
        acc = float(sum((model(x).argmax(1) == y).sum() for x, y in data.test.batches(256)) / len(data.test))
    return {"teacher_accuracy_plain_torch": acc, "train_seconds": None, "reused_teacher": True,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def run_reduce(
    folder: Path, checkpoint: str, extra: list[str], finetune: int, samples: int | None, lr: float | None
) -> dict[str, Any]:
    """`odekit reduce` in a subprocess, as a user runs it; wall time and that process's peak RSS."""
    out = folder / f"reduce-{checkpoint.replace('.', '_')}-ft{finetune}"
    cmd = [sys.executable, "-c", "from odekit.cli.app import main; main()", "reduce", checkpoint, *extra,
           "--mode", "region", "--layers", "7-16", "--data", "digits32.npz", "--normalize", "none", "--finetune", str(finetune),
           "--device", "cpu", "-o", str(out), "--force", "--json"]  # fmt: skip
    if samples is not None:
        cmd += ["--fit-samples", str(samples)]
    if lr is not None:
        cmd += ["--lr", str(lr)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with open(folder / "stdout.json", "w") as stdout, open(folder / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (folder / "stderr.log").read_text()[-1500:]
        return {"ok": False, "exit_code": proc.returncode, "stderr_tail": tail, "wall_seconds": wall}
    r = json.loads((folder / "stdout.json").read_text())["results"]
    teacher, student = r["teacher"], r["student"]
    return {
        "ok": True,
        "wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
        "flop_reduction": r["flop_reduction"],
        "param_reduction": r["param_reduction"],
        "teacher_flops": teacher["flops"],
        "student_flops": student["flops"],
        "teacher_params": teacher["params"],
        "student_params": student["params"],
        "teacher_accuracy": teacher["accuracy"],
        "student_accuracy_before_finetune": student["accuracy_before_finetune"],
        "student_accuracy": student["accuracy"],
        "drop_points_before_finetune": 100 * (teacher["accuracy"] - student["accuracy_before_finetune"]),
        "drop_points_after_finetune": 100 * (teacher["accuracy"] - student["accuracy"]) if finetune else None,
        "agreement": r.get("agreement"),
        "mean_kl": r.get("mean_kl"),
        "latency_speedup": r["latency_speedup"],
        "latency": r.get("latency"),
        "ranks": r["ranks"],
        "onnx": _onnx_summary(r["onnx"]) if "onnx" in r else None,
    }


def _onnx_summary(onnx: dict[str, Any]) -> dict[str, Any]:
    """--export-onnx: the onnxruntime check and both runtimes' latency ratios (odekit's report)."""
    latency = onnx["latency"]
    return {"max_abs_diff": onnx["check"]["max_abs_diff"], "relative_diff": onnx["check"]["relative_diff"],
            "matches": onnx["check"]["matches"], "median_ms_per_batch": latency["median_ms_per_batch"],
            "batch": latency["batch"], "speedup_pytorch": latency.get("speedup_pytorch"),
            "speedup_onnxruntime": latency.get("speedup_onnxruntime"), "teacher_onnx": onnx.get("teacher_onnx")}  # fmt: skip


def goals(rec: dict[str, Any]) -> dict[str, bool]:
    return {
        "flops_ge_1.5x": rec["flop_reduction"] >= 1.5,
        "drop_le_0.5_points_without_finetune": rec["drop_points_before_finetune"] <= 0.5,
        "latency_ge_0.7_flop_ratio": rec["latency_speedup"] >= 0.7 * rec["flop_reduction"],
        "wall_le_3_min": rec["wall_seconds"] <= 180,
        "peak_rss_le_3_gb": rec["peak_rss_mb"] <= 3 * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 1/8, 3 epochs")
    parser.add_argument("--width-div", type=int, default=None, help="divide VGG-19's channels by this [1; quick 8]")
    parser.add_argument("--epochs", type=int, default=None, help="teacher training epochs [3]")
    parser.add_argument("--train-samples", type=int, default=None, help="teacher training samples [all]")
    parser.add_argument("--samples", type=int, default=None, help="reduce --fit-samples [odekit's default]")
    parser.add_argument("--formats", default="pickle,export", help="which saves to reduce: pickle,export")
    parser.add_argument("--finetune-lr", type=float, default=None, help="reduce --lr [odekit's default]")
    parser.add_argument("--export-onnx", action="store_true", help="reduce --export onnx: student latency in onnxruntime too")
    parser.add_argument("--reuse", action="store_true", help="reuse vgg19.pt/.pt2 already in --out (no training)")
    parser.add_argument("--out", type=Path, default=None, help="run folder [odekit-runs/bench-vgg19-reduce]")
    args = parser.parse_args()
    width = args.width_div or (8 if args.quick else 1)
    epochs = args.epochs or 3
    train_samples = args.train_samples
    # scratch runs (smoke tests) keep their models next to their results
    scratch = os.environ.get("ODEKIT_BENCH_RESULTS")
    args.out = args.out or (Path(scratch) / "vgg19-run" if scratch else ROOT / "odekit-runs" / "bench-vgg19-reduce")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = write_data(args.out, train_samples)
    if args.reuse and (args.out / "vgg19.pt").exists() and (args.out / "vgg19.pt2").exists():
        trained = reuse_trained(args.out, data)
    else:
        trained = train_user_vgg(args.out, data, width, epochs, train_samples)
    runs = {"pickle": ("vgg19.pt", ["--trust-checkpoint"], 0), "export": ("vgg19.pt2", [], 1)}
    failed = 0
    for fmt in args.formats.split(","):
        checkpoint, extra, finetune = runs[fmt.strip()]
        extra = [*extra, "--export", "onnx"] if args.export_onnx else extra
        rec = run_reduce(args.out, checkpoint, extra, finetune, args.samples, args.finetune_lr)
        record = {
            "case": "vgg19_reduce",
            "format": fmt,
            "checkpoint": checkpoint,
            "width_div": width,
            "train_epochs": None if trained.get("reused_teacher") else epochs,
            "train_samples": len(data.train) if train_samples is None else train_samples,
            "finetune_epochs": finetune,
            "finetune_lr": args.finetune_lr,
            "quick": args.quick,
            "load_average_1min": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            **trained,
            **rec,
        }
        if rec["ok"]:
            record["goals"] = goals(rec)
        failed += not rec["ok"]
        emit(record)
    if failed:
        sys.exit(f"{failed} reduce run(s) failed; see stderr_tail above")


if __name__ == "__main__":
    main()
