"""ONNX deployment of a model: `odekit.export_onnx`, and `export="onnx"` of reduce and asnet.

The model is exported with a dynamic batch dimension, run in onnxruntime against PyTorch on
test inputs (the largest difference is recorded; it must stay within 1e-4 of the logits'
scale), and timed in both runtimes, interleaved (beside its teacher for a compressed model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odekit.api.defaults import EXPORT_FORMATS
from odekit.api.inputs import ModelLike, as_dataset, as_loaded
from odekit.api.results import Claim, RunResult
from odekit.errors import UnsupportedModelError, UsageError
from odekit.methods.onnx_export import (
    OnnxCheck,
    RuntimeLatency,
    check_onnx,
    onnx_bytes,
    runtime_latency,
    session,
)
from odekit.writers.atomic import atomic_write_bytes
from odekit.writers.tables import ReportTable

CHECK_BATCH = 64  # test inputs the onnxruntime check runs
LATENCY_REPEATS = 20


def check_export_format(export: str | None) -> str | None:
    """None or a known export format (`UsageError` otherwise)."""
    if export is None:
        return None
    key = export.strip().lower()
    if key not in EXPORT_FORMATS:
        raise UsageError(f"unknown `export` format '{export}'", f"choose one of: {', '.join(EXPORT_FORMATS)}")
    return key


@dataclass(frozen=True)
class OnnxDeployment:
    """An exported model's bytes, its onnxruntime check and the runtimes' latency."""

    model_bytes: bytes
    check: OnnxCheck
    latency: RuntimeLatency
    teacher_note: str | None = None  # why the teacher has no onnxruntime time

    def to_dict(self) -> dict[str, Any]:
        out = {"file_bytes": len(self.model_bytes), "dynamic_batch": True, "check": self.check.to_dict(),
               "latency": self.latency.to_dict()}  # fmt: skip
        if self.teacher_note:
            out["teacher_onnx"] = self.teacher_note
        return out

    def table(self, name: str) -> ReportTable:
        medians = self.latency.to_dict()["median_ms_per_batch"]
        rows = [[key.split("/")[1], key.split("/")[0], ms] for key, ms in sorted(medians.items())]
        return ReportTable(f"ONNX {name}: latency per batch of {self.latency.batch} (CPU, interleaved)",
                           ["model", "runtime", "median ms"], rows)  # fmt: skip


def onnx_headline(deployment: OnnxDeployment) -> str:
    """One line: the check and the latency ratios."""
    check, latency = deployment.check, deployment.latency.to_dict()
    ratios = ", ".join(f"{key} {value:.2f}x" for key, value in latency.items() if key.startswith(("speedup", "onnxruntime_over")))
    return (f"ONNX: max |onnxruntime - PyTorch| = {check.max_abs_diff:.3g} ({check.relative_diff:.2g} of the logits' "
            f"scale, {'within' if check.matches else 'ABOVE'} 1e-4); {ratios}")  # fmt: skip


def deploy_onnx(
    model: nn.Module, input_shape: tuple[int, ...], inputs: torch.Tensor, teacher: nn.Module | None = None,
    repeats: int = LATENCY_REPEATS,
) -> OnnxDeployment:  # fmt: skip
    """Export ``model``, check it on ``inputs[:CHECK_BATCH]`` and time it (and ``teacher``, in both
    runtimes when the teacher exports too) on ``inputs``."""
    data = onnx_bytes(model, input_shape)
    sess = session(data)
    check = check_onnx(sess, model, inputs[:CHECK_BATCH])
    name = "student" if teacher is not None else "model"
    models, sessions = {name: model}, {name: sess}
    note = None
    if teacher is not None:
        models["teacher"] = teacher
        try:
            sessions["teacher"] = session(onnx_bytes(teacher, input_shape))
        except UnsupportedModelError as exc:
            note = exc.message
    return OnnxDeployment(data, check, runtime_latency(models, sessions, inputs, repeats), note)


@dataclass(frozen=True)
class OnnxExport(RunResult):
    """`export_onnx`'s result: ``.model_bytes``, the check, the latency; ``save`` writes model.onnx."""

    deployment: OnnxDeployment | None = None

    @property
    def model_bytes(self) -> bytes:
        return self.deployment.model_bytes if self.deployment is not None else b""

    def write(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the ONNX model alone to ``path``."""
        return atomic_write_bytes(Path(path), self.model_bytes, force)

    def write_outputs(self, claim: Claim, force: bool) -> dict[str, Any]:
        path = self.write(claim("model.onnx"), force=force)
        return {"onnx_path": str(path)}


def export_onnx(
    model: ModelLike, data: Any = None, *, input_shape: tuple[int, ...] | None = None, batch: int = 256,
    repeats: int = LATENCY_REPEATS, test: Any = None,
) -> OnnxExport:  # fmt: skip
    """Export ``model`` to ONNX with a dynamic batch dimension, check it in onnxruntime against
    PyTorch on test inputs of ``data`` (its own data set for an odekit checkpoint) and time both
    runtimes on a batch of ``batch`` inputs. ``.save(folder)`` writes model.onnx and the report."""
    loaded = as_loaded(model, input_shape)
    dataset = as_dataset(data, loaded, test=test)
    shape = tuple(input_shape or loaded.input_shape or dataset.input_shape)
    inputs = dataset.test.x[:batch] if len(dataset.test) else dataset.train.x[:batch]
    return run_export(loaded.model, shape, inputs, repeats=repeats, params={"to": "onnx", "batch": batch},
                      inputs_record={"checkpoint": {"path": str(loaded.path), "sha256": loaded.sha256}})  # fmt: skip


def run_export(
    model: nn.Module, shape: tuple[int, ...], inputs: torch.Tensor, *, repeats: int, params: dict[str, Any],
    inputs_record: dict[str, Any],
) -> OnnxExport:  # fmt: skip
    """Export, check and time one model (the CLI's `odekit export` and `export_onnx` share this)."""
    deployment = deploy_onnx(model, shape, inputs, repeats=repeats)
    headline = [f"ONNX model of {len(deployment.model_bytes) / 1e6:.2f} MB, dynamic batch. " + onnx_headline(deployment)]
    return OnnxExport(command="export", results={"onnx": deployment.to_dict()}, inputs=inputs_record, params=params,
                      tables=[deployment.table("model")], headline=headline, device="cpu", deployment=deployment)  # fmt: skip
