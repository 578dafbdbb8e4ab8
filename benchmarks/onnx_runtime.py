"""ONNX deployment of the shipped checkpoints and their RON students: onnxruntime against PyTorch.

    .venv/bin/python benchmarks/onnx_runtime.py --quick   # lenet300 and vgg11, batch 64
    .venv/bin/python benchmarks/onnx_runtime.py           # every shipped classifier, batch 256

For each checkpoint the model is exported with a dynamic batch dimension (odekit.export_onnx),
run in onnxruntime on test inputs against PyTorch (largest |difference|, relative to the largest
|logit|; the goal is <= 1e-4) and timed in both runtimes, interleaved, on the CPU. For the
checkpoints of REDUCE, odekit.reduce(..., export="onnx") then compresses the layers and times
teacher and student in both runtimes. One JSON line per case (benchmarks/results/onnx_runtime.jsonl)
with the ratios: onnxruntime/PyTorch time of each model, and the student's speed-up in each runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from measure import (  # benchmarks/measure.py (the script folder is on sys.path)
    emit_line,
    results_path,
)

import odekit

RESULTS = results_path("onnx_runtime")
CHECKPOINTS = ("lenet300", "lenet5", "vgg11", "resnet20")
REDUCE = {"lenet300": ("1-2", "20"), "vgg11": ("3-8", "vbmf"), "resnet20": ("8-13", "32")}


def load_average() -> float:
    return os.getloadavg()[0]


def case(name: str, batch: int, repeats: int) -> dict[str, Any]:
    path = f"checkpoints/{name}_digits.safetensors"
    start = time.perf_counter()
    exported = odekit.export_onnx(path, batch=batch, repeats=repeats)
    onnx = exported.to_dict()["onnx"]
    record: dict[str, Any] = {"case": "onnx_export", "model": name, "batch": batch, "seconds": time.perf_counter() - start,
                              "file_mb": onnx["file_bytes"] / 1e6, **_check(onnx),
                              "onnxruntime_over_pytorch": onnx["latency"]["onnxruntime_over_pytorch_model"],
                              "median_ms_per_batch": onnx["latency"]["median_ms_per_batch"]}  # fmt: skip
    return record


def reduce_case(name: str, batch: int) -> dict[str, Any]:
    layers, rank = REDUCE[name]
    start = time.perf_counter()
    result = odekit.reduce(f"checkpoints/{name}_digits.safetensors", layers=layers, rank=rank, latency_batch=batch,
                           export="onnx", device="cpu", progress=False)  # fmt: skip
    r = result.to_dict()
    latency = r["onnx"]["latency"]
    return {"case": "onnx_student", "model": name, "layers": layers, "rank": rank, "batch": batch,
            "seconds": time.perf_counter() - start, **_check(r["onnx"]), "flop_reduction": r["flop_reduction"],
            "agreement": r["agreement"], "speedup_pytorch": latency["speedup_pytorch"],
            "speedup_onnxruntime": latency.get("speedup_onnxruntime"),
            "onnxruntime_over_pytorch_student": latency["onnxruntime_over_pytorch_student"],
            "onnxruntime_over_pytorch_teacher": latency.get("onnxruntime_over_pytorch_teacher"),
            "median_ms_per_batch": latency["median_ms_per_batch"]}  # fmt: skip


def _check(onnx: dict[str, Any]) -> dict[str, Any]:
    check = onnx["check"]
    return {"max_abs_diff": check["max_abs_diff"], "relative_diff": check["relative_diff"], "matches": check["matches"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lenet300 and vgg11 only, batch 64, 10 repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-students", action="store_true", help="export the checkpoints only")
    parser.add_argument("--models", default=None, help=f"comma list [{','.join(CHECKPOINTS)}]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else ("lenet300", "vgg11") if args.quick else CHECKPOINTS
    batch, repeats = (64, 10) if args.quick else (256, 20)
    for name in names:
        common = {"threads": args.threads, "quick": args.quick, "load_average_1min": load_average()}
        emit_line(RESULTS, json.dumps({**case(name, batch, repeats), **common}))
        if name in REDUCE and not args.no_students:
            emit_line(RESULTS, json.dumps({**reduce_case(name, batch), **common}))


if __name__ == "__main__":
    main()
