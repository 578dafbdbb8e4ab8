"""Each CLI command and its API function give the same report.json for the same inputs
(timings, latencies and file paths aside)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import odekit
from odekit.cli.app import app

VOLATILE = re.compile(r"latency|seconds|_ms|speedup|throughput|stream_rank0|path|checkpoint$|program$|plot$|rank_device")
CKPT = "checkpoints/lenet300_digits.safetensors"


def stable(value: Any) -> Any:
    """``value`` without the entries that differ between two identical runs (times, paths)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def cli_report(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def api_report(tmp_path: Path, result: Any) -> dict[str, Any]:
    return json.loads(result.save(tmp_path / "api").read_text())


def same(cli: dict[str, Any], api: dict[str, Any]) -> None:
    assert cli["command"] == api["command"]
    assert stable(cli["results"]) == stable(api["results"])
    assert set(api["outputs"]) == set(cli["outputs"])


def test_reduce(tmp_path):
    cli = cli_report(tmp_path, "reduce", CKPT, "--layers", "1-2", "--rank", "20", "--fit-samples", "200",
                     "--latency-batch", "8")  # fmt: skip
    api = api_report(tmp_path, odekit.reduce(CKPT, layers="1-2", rank=20, fit_samples=200, latency_batch=8, device="cpu"))
    same(cli, api)


def test_asnet(tmp_path):
    cli = cli_report(tmp_path, "asnet", CKPT, "--cut", "1", "--rank", "8", "--fit-samples", "300", "--no-latency")
    api = api_report(tmp_path, odekit.asnet(CKPT, cut=1, rank=8, fit_samples=300, latency=False, device="cpu"))
    same(cli, api)


def test_attack(tmp_path):
    cli = cli_report(tmp_path, "attack", CKPT, "--method", "active-subspace", "--delta", "2,3", "--fit-samples", "60",
                     "--eval-samples", "100", "--max-iters", "20")  # fmt: skip
    api = api_report(tmp_path, odekit.attack(CKPT, delta=[2, 3], fit_samples=60, eval_samples=100, max_iters=20,
                                             device="cpu"))  # fmt: skip
    same(cli, api)


def test_smoothness_check(tmp_path):
    ode = "checkpoints/odenet4_digits_euler.safetensors"
    cli = cli_report(tmp_path, "smoothness-check", ode, "--solvers", "euler,rk2", "--steps", "2,4", "--eval-samples", "60")
    api = api_report(tmp_path, odekit.smoothness_check(ode, solvers=["euler", "rk2"], steps=[2, 4], eval_samples=60,
                                                        device="cpu"))  # fmt: skip
    same(cli, api)


@pytest.mark.slow  # an ONNX export is ~5 s; docs/api.md's example (test_api_docs) covers one in the default suite
@pytest.mark.filterwarnings("ignore")
def test_export(tmp_path):
    pytest.importorskip("onnxruntime")
    cli = cli_report(tmp_path, "export", CKPT, "--to", "onnx", "--latency-batch", "32")
    api = api_report(tmp_path, odekit.export_onnx(CKPT, batch=32))
    assert stable(cli["results"])["onnx"]["check"] == stable(api["results"])["onnx"]["check"]
    assert set(api["outputs"]) == set(cli["outputs"]) == {"model.onnx", "report.json", "report.md"}


def test_certify(tmp_path):
    cli = cli_report(tmp_path, "certify", CKPT, "--eval-samples", "60", "--no-attack", "--eps", "0.05,0.1")
    api = api_report(tmp_path, odekit.certify(CKPT, eval_samples=60, attack=False, eps=[0.05, 0.1], device="cpu",
                                              progress=False))  # fmt: skip
    same(cli, api)
