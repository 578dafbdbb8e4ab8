"""Issue 17 with real processes: signals at the risky moments, and two runs racing on one --out.

After any interruption --out is either absent or a complete set that loads and agrees with its
report; of two racing runs exactly one installs its set and the other fails with one clean line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odekit.io.checkpoints import load_model

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "lenet300_digits.safetensors"
TINY = ["--layers", "1-2", "--mode", "region", "--fit-samples", "100", "--latency-batch", "4"]


def start(out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from odekit.cli.app import main; main()", "reduce", str(CKPT), *TINY, "-o", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(out: Path, what: str, proc: subprocess.Popen[str], timeout: float = 180.0) -> None:
    """Block until the run's staging folder exists ('body') or holds the student ('model')."""
    pattern = f".{out.name}.odekit-staging.*" + ("/student.safetensors" if what == "model" else "")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(out.parent.glob(pattern)):
            return
        time.sleep(0.01)
    raise AssertionError(f"run ended or timed out before '{what}' (rc={proc.poll()})")


def assert_absent_or_complete(out: Path) -> str:
    litter = [p.name for p in out.parent.glob(f".{out.name}.odekit-*") if not p.name.endswith(".lock")]
    if not out.exists():
        return "absent" if not litter else f"absent, stale {litter}"
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["outputs"]) == sorted(p.name for p in out.iterdir())
    student = load_model(out / "student.safetensors")
    assert student.meta.history[-1]["ranks"] == report["results"]["ranks"]
    return "complete"


def test_race_two_runs_one_out(tmp_path: Path) -> None:
    out = tmp_path / "o"
    procs = [start(out), start(out)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1).strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith("Error: ") and "Hint: " in loser[0]
    assert "in use by another odekit run (pid " in loser[0] or "exists already" in loser[0]
    assert assert_absent_or_complete(out) == "complete"


def test_sigterm_after_model_written_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = start(out)
    wait_for(out, "model", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert "interrupted by SIGTERM" in (proc.stderr.read() if proc.stderr else "")
    assert assert_absent_or_complete(out) == "absent"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize("moment", ["body", "model"])
@pytest.mark.parametrize("force_over_old", [False, True])
def test_signal_matrix(tmp_path: Path, sig: signal.Signals, moment: str, force_over_old: bool) -> None:
    out = tmp_path / "o"
    extra: list[str] = ["--finetune", "2"]
    if force_over_old:
        assert start(out, "--rank", "5").wait(timeout=300) == 0
        extra += ["--force", "--rank", "10"]
    proc = start(out, *extra)
    wait_for(out, moment, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig]
    state = assert_absent_or_complete(out)
    if force_over_old:
        assert state == "complete"
        assert json.loads((out / "report.json").read_text())["results"]["ranks"] == [5, 5]  # the old set, whole
    elif sig == signal.SIGKILL:
        assert state.startswith("absent")
        assert start(out).wait(timeout=300) == 0  # a later run sweeps the stale staging
        assert assert_absent_or_complete(out) == "complete"
    else:
        assert state == "absent"
