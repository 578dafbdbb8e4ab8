"""benchmarks/lipschitz.py still runs (tiny settings) and writes sound JSON lines (slow: ~1 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lipschitz_benchmark_quick(tmp_path):
    env = {**os.environ, "ODEKIT_BENCH_RESULTS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lipschitz.py"), "--quick", "--channels", "16",
                           "--size", "16", "--power-iters", "10"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "lipschitz.jsonl").read_text().splitlines()]
    assert {d["case"] for d in lines} == {"dense", "fft"}
    assert all(d["sound"] for d in lines if d["case"] == "dense")
    assert all(1.0 - 1e-6 <= d["tightness"] <= 1.05 for d in lines if d["case"] == "fft")
