"""ONNX export of a model (dynamic batch dimension), its check in onnxruntime against PyTorch,
and latency of PyTorch and onnxruntime measured interleaved.

Needs the optional packages of ``odekit[onnx]`` (onnx, onnxruntime, onnxscript): torch's
exporter traces the model with torch.export and translates every aten op with onnxscript.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from odekit.errors import UnsupportedModelError, UsageError

TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| logit difference, relative to the largest |logit|
_TRACE_BATCH = 2  # torch.export cannot keep a dimension of size 1 dynamic
_MAX_BATCH = 1 << 20
EXTRA = "pip install 'odekit[onnx]' (onnx, onnxruntime, onnxscript)"
# how the exporter names the op it could not translate, most specific first
_OP_PATTERNS = (
    re.compile(r"op='([\w.]+)', overload='(\w+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"\b((?:aten|prims)[.:]{1,2}\w+(?:\.\w+)?)"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _require_runtime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise UsageError("ONNX export needs onnxruntime, which is not installed", EXTRA) from exc
    return onnxruntime


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress and warnings; the library never prints."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """``model`` (eval mode, CPU, float32) as an ONNX model whose batch dimension is free;
    a model the exporter cannot translate is an `UnsupportedModelError` naming the op."""
    _require_runtime()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model = model.cpu().eval()
    example = torch.zeros(_TRACE_BATCH, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    try:
        with _quiet():
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                        verbose=False, optimize=True)  # fmt: skip
            if program is None:
                raise RuntimeError("the exporter returned no program")
            data: bytes = program.model_proto.SerializeToString()
    except ImportError as exc:
        raise UsageError(f"ONNX export needs {exc.name or 'onnxscript'}, which is not installed", EXTRA) from exc
    except Exception as exc:
        raise UnsupportedModelError(f"the model does not export to ONNX ({_failure(exc)})", "keep the .safetensors/.pt2 model, "
                                    "or rewrite that op with ops ONNX has") from exc  # fmt: skip
    finally:
        model.to(device)
    return data


def _failure(exc: BaseException) -> str:
    """One line naming the op that failed, when the exporter's message names one, else the
    exception its summary ends with."""
    text = _ANSI.sub("", f"{exc}\n{exc.__cause__ or ''}")
    for pattern in _OP_PATTERNS:
        found = pattern.search(text)
        if found:
            return f"op {'.'.join(found.groups())} has no ONNX translation"
    summary = text.split("## Exception summary", 1)[-1]
    first = next((line.strip() for line in summary.splitlines() if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first[:200]}"


def session(model_bytes: bytes) -> Any:
    """An onnxruntime CPU session with as many threads as torch uses."""
    ort = _require_runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, x: torch.Tensor) -> torch.Tensor:
    """The session's first output for input ``x`` (a CPU tensor comes back)."""
    name = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {name: x.detach().cpu().float().numpy()})[0])


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime against PyTorch on the same inputs."""

    batch: int
    max_abs_diff: float
    logits_scale: float  # largest |logit| of the PyTorch model

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.logits_scale, 1e-12)

    @property
    def matches(self) -> bool:
        return self.relative_diff <= TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "max_abs_diff": self.max_abs_diff, "logits_scale": self.logits_scale,
                "relative_diff": self.relative_diff, "tolerance": TOLERANCE, "matches": self.matches}  # fmt: skip


@torch.no_grad()
def check_onnx(sess: Any, model: nn.Module, x: torch.Tensor) -> OnnxCheck:
    """Largest |onnxruntime - PyTorch| output difference on ``x`` (run on the CPU)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    want = model.eval()(x.to(device)).cpu()
    got = run_session(sess, x)
    if got.shape != want.shape:
        raise UnsupportedModelError(f"the ONNX model returns shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}")
    return OnnxCheck(int(x.shape[0]), float((got - want).abs().max()), float(want.abs().max()))


@dataclass(frozen=True)
class RuntimeLatency:
    """Median ms per batch of each (runtime, model), all timed interleaved in random order."""

    batch: int
    repeats: int
    times_ms: dict[str, list[float]]  # "pytorch/teacher", "onnxruntime/student"...

    def median(self, key: str) -> float:
        return statistics.median(self.times_ms[key])

    def to_dict(self) -> dict[str, Any]:
        medians = {key: self.median(key) for key in self.times_ms}
        out: dict[str, Any] = {"batch": self.batch, "repeats": self.repeats, "device": "cpu",
                               "method": "every (runtime, model) pair timed once per round, in a shuffled order",
                               "median_ms_per_batch": medians}  # fmt: skip
        if {"pytorch/teacher", "pytorch/student", "onnxruntime/teacher", "onnxruntime/student"} <= set(medians):
            out["speedup_pytorch"] = medians["pytorch/teacher"] / max(medians["pytorch/student"], 1e-12)
            out["speedup_onnxruntime"] = medians["onnxruntime/teacher"] / max(medians["onnxruntime/student"], 1e-12)
        for name in ("teacher", "student", "model"):
            if f"pytorch/{name}" in medians and f"onnxruntime/{name}" in medians:
                out[f"onnxruntime_over_pytorch_{name}"] = medians[f"onnxruntime/{name}"] / max(medians[f"pytorch/{name}"], 1e-12)
        return out


@torch.no_grad()
def runtime_latency(
    models: dict[str, nn.Module], sessions: dict[str, Any], x: torch.Tensor, repeats: int = 20, warmup: int = 3
) -> RuntimeLatency:
    """Each model in PyTorch (CPU) and each session in onnxruntime, timed once per round in a
    seeded shuffled order, so load changes on a shared machine hit all of them alike."""
    x = x.detach().cpu().float()
    devices = {name: next((p.device for p in m.parameters()), torch.device("cpu")) for name, m in models.items()}
    runners: dict[str, Callable[[], Any]] = {}
    for name, model in models.items():
        model.cpu().eval()
        runners[f"pytorch/{name}"] = functools.partial(model, x)
    for name, sess in sessions.items():
        runners[f"onnxruntime/{name}"] = functools.partial(run_session, sess, x)
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    shuffle = random.Random(0)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for key in order:
            start = time.perf_counter()
            runners[key]()
            times[key].append((time.perf_counter() - start) * 1e3)
    for name, model in models.items():
        model.to(devices[name])
    return RuntimeLatency(int(x.shape[0]), repeats, times)
