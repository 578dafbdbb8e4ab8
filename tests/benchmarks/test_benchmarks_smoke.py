"""Every benchmark script still runs (tiny settings) and writes parseable JSON lines.

Slow: about 2.5 minutes in all. Results go to a temporary folder through
$ODEKIT_BENCH_RESULTS, so the recorded ones in benchmarks/results/ stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

CASES = {
    "ode_gradients": ["--quick", "--cases", "dissipative-block"],
    "train_ode": ["--quick", "--cases", "pinwheel", "--methods", "irdm@1e-2,torchdiffeq_adjoint"],
    "reduce": ["--quick", "--only", "scale", "--rows", "300", "--exact-rows", "200"],
    "asnet": ["--quick", "--only", "sketch"],
    "distributed": ["--quick", "--samples", "64", "--width", "0.125", "--rank", "4", "--sketch-size", "16"],
    "vgg19_reduce": ["--quick", "--width-div", "8", "--epochs", "1", "--formats", "export", "--samples", "200"],
    "universal_attack": ["--quick", "--seeds", "1", "--deltas", "2", "--fit-samples", "20",
                         "--max-passes", "1"],
    "compression_peers": ["--models", "resnet20", "--budgets", "2", "--methods", "odekit,thinet,svd",
                          "--fit-samples", "64", "--repeats", "2"],
    "varpro": ["--quick", "--units", "6", "--samples", "100", "--width", "4", "--depth", "2"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_json_lines(name, tmp_path):
    recorded = ROOT / "benchmarks" / "results" / f"{name}.jsonl"
    before = recorded.read_bytes() if recorded.exists() else None
    env = {**os.environ, "ODEKIT_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *CASES[name]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    after = recorded.read_bytes() if recorded.exists() else None
    assert after == before
