"""Graphs of foreign models: trace any traceable ``nn.Module`` (or take a ``.pt2`` program's
GraphModule) and normalise it so that odekit's module-based tools work on it.

``trace_graph(model, input_shape)`` tries ``torch.fx.symbolic_trace`` first (module names and
calls are kept as they are), then ``torch.export`` (for forwards that fx cannot follow, e.g.
shape-dependent Python branches); an untraceable forward gives one line naming the failing op
and the user's file and line.

``normalize_graph`` rewrites a GraphModule in place of a copy:

* functional conv / linear / batch-norm calls whose weights are graph attributes
  (``aten.conv2d.default`` with ``get_attr`` weights in an exported program, ``F.linear(x,
  self.w)`` in an fx trace) become real ``nn.Conv*d`` / ``nn.Linear`` / BatchNorm submodules
  holding the same parameters, named after the weights' owner (``features.0``), so layer
  tables, forward hooks, activation streaming and per-sample gradients work on them;
* functional max-pools become ``nn.MaxPool*d`` submodules;
* in-place aten ops on a tensor nobody else reads (``relu_``, ``add_``) become their
  out-of-place forms, so re-running single nodes never mutates a caller's tensor;
* an exported program's batch-size queries (``sym_size(x, 0)`` feeding a later ``view``) are
  re-read from the tensor being reshaped, so no symbolic size crosses a cut of the graph;
* an exported program's input-guard call is dropped and its pytree output is unwrapped to the
  single tensor it returns.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.errors import UnsupportedModelError
from odekit.models.graph_cleanup import (
    _drop_guards_and_unwrap,
    _functionalise,
    _relocate_batch_sizes,
)
from odekit.models.graph_ops import (
    _BN_TARGETS,
    _CONV_TARGETS,
    _LINEAR_TARGETS,
    _POOL_TARGETS,
    _SYM_SIZE,
    ACTIVATION_TARGETS,
    AFFINE_TARGETS,
    LiftedBatchNorm,
    _lift_batchnorm,
    _lift_conv,
    _lift_linear,
    _lift_pool,
    _Lifter,
    _undecompose,
    aten,
    probe_batch,
)

__all__ = [
    "ACTIVATION_TARGETS",
    "AFFINE_TARGETS",
    "LiftedBatchNorm",
    "has_functional_compute",
    "hidden_compute",
    "normalize_graph",
    "probe_batch",
    "run_node",
    "runnable",
    "scripted_graph",
    "trace_graph",
]

# how to turn a TorchScript archive into something odekit can rewrite (one hint everywhere)
TORCHSCRIPT_HINT = (
    "pass the state dict with `arch` path/to/file.py:ClassName, or export it once in Python: "
    "torch.export.save(torch.export.export(model.eval(), (example_input,)), 'model.pt2') (docs/own-models.md)"
)


def has_functional_compute(gm: fx.GraphModule) -> bool:
    """True when the graph computes conv/linear through functions rather than modules."""
    decomposed = {aten.convolution.default, aten.addmm.default, aten.mm.default}
    return any(
        n.op == "call_function" and (n.target in _CONV_TARGETS or n.target in _LINEAR_TARGETS or n.target in decomposed)
        for n in gm.graph.nodes
    )


_NORMALISED = "_odekit_normalised"  # set on graphs normalize_graph made, so a second call is free


def _needs_normalising(gm: fx.GraphModule) -> bool:
    if getattr(gm, _NORMALISED, False):
        return False
    lifted = set(_CONV_TARGETS) | _LINEAR_TARGETS | set(_BN_TARGETS) | set(_POOL_TARGETS) | {_SYM_SIZE}
    return getattr(gm.graph._codegen, "pytree_info", None) is not None or any(
        (n.op == "call_function" and (n.target in lifted or isinstance(n.target, torch._ops.OpOverload)))
        or (n.op == "call_module" and str(n.target).startswith("_guards_fn"))
        for n in gm.graph.nodes
    )


def normalize_graph(gm: fx.GraphModule, input_shape: tuple[int, ...] | list[int] | None = None) -> fx.GraphModule:
    """A normalised copy of ``gm`` (see the module docstring); ``gm`` itself is left alone.
    With ``input_shape`` the copy is checked to compute what ``gm`` computes."""
    if not _needs_normalising(gm):
        return gm
    out = _drop_guards_and_unwrap(copy.deepcopy(gm))
    lifter = _Lifter(out)
    for node in list(out.graph.nodes):
        if node.op == "call_function":
            _undecompose(out, node)
    for node in list(out.graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target in _CONV_TARGETS:
            _lift_conv(out, node, _CONV_TARGETS[target], lifter)
        elif target in _LINEAR_TARGETS:
            _lift_linear(out, node, lifter)
        elif target in _BN_TARGETS:
            _lift_batchnorm(out, node, _BN_TARGETS[target], lifter)
        elif target in _POOL_TARGETS:
            _lift_pool(node, _POOL_TARGETS[target], lifter)
        else:
            _functionalise(node)
    _relocate_batch_sizes(out)
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    out.eval()  # an exported graph is an eval-mode graph; new BatchNorm modules start in training mode
    setattr(out, _NORMALISED, True)
    if input_shape is not None:
        _check_same(gm, out, input_shape)
    return out


def _check_same(original: nn.Module, new: nn.Module, input_shape: tuple[int, ...] | list[int]) -> None:
    x = torch.randn(probe_batch(original, input_shape, 3).shape, generator=torch.Generator().manual_seed(0))
    x = x.to(probe_batch(original, input_shape, 1))
    with torch.no_grad():
        want, got = original(x), new(x)
    if isinstance(want, tuple | list) and len(want) == 1:
        want = want[0]
    scale = 1.0 + float(want.abs().max()) if isinstance(want, Tensor) and want.numel() else 1.0
    if not (isinstance(want, Tensor) and want.shape == got.shape and float((want - got).abs().max()) <= 1e-4 * scale):
        raise UnsupportedModelError(
            "odekit's graph normalisation changed the model's outputs (an op it rewrites behaves unusually)",
            "please report the model; meanwhile export it without in-place ops",
        )


# ----------------------------------------------------------------------------- tracing

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def _user_frame(exc: BaseException) -> str:
    """'file.py:LINE (code)' of the innermost traceback frame outside torch, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not str(Path(f.filename).resolve()).startswith(_TORCH_DIR)]
    frames = [f for f in frames if "odekit" not in Path(f.filename).parts]
    if not frames:
        return ""
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f"{f.filename}:{f.lineno}{code}"


def _export_location(message: str) -> str:
    """torch.export names the failing user call as 'File "x.py", line 7, in forward' + code."""
    lines = message.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith('File "') and ", line " in line:
            path = line.split('"')[1]
            if str(Path(path).resolve()).startswith(_TORCH_DIR):
                continue
            lineno = line.split(", line ")[1].split(",")[0]
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{path}:{lineno}" + (f" `{code}`" if code else "")
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def trace_graph(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int] | None = None,
    *,
    what: str = "odekit",
) -> fx.GraphModule:
    """A normalised GraphModule computing ``model`` (see the module docstring). ``what`` names
    the caller in the error message ('RON', 'ASNet')."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{what} needs the model's Python module or a torch.export archive, not TorchScript",
            "export it with torch.export.save(torch.export.export(model, (x,)), 'model.pt2') or pass `arch`",
        )
    if isinstance(model, fx.GraphModule):
        return normalize_graph(model, input_shape)
    was_training = model.training
    model.eval()
    try:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as fx_exc:
            if input_shape is None:
                raise _untraceable(what, fx_exc, None) from fx_exc
            try:
                gm = _export_module(model, input_shape)
            except Exception as export_exc:
                raise _untraceable(what, fx_exc, export_exc) from export_exc
        if input_shape is not None and hidden_compute(gm):
            # attention (and other torch.nn leaves computing with their own weight matrices):
            # the exported graph opens them up, as a .pt2 of the same model does
            with contextlib.suppress(Exception):
                gm = _export_module(model, input_shape)
    finally:
        model.train(was_training)
    return normalize_graph(gm, input_shape)


_VISIBLE = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding, nn.EmbeddingBag,
)  # fmt: skip


def hidden_compute(model: nn.Module) -> bool:
    """True when a module computes with weight matrices it owns directly, out of reach of
    conv/linear forward hooks (``nn.MultiheadAttention``'s ``in_proj_weight``; an fx graph's
    leaf modules are what counts for a GraphModule)."""
    if isinstance(model, fx.GraphModule):
        leaves = [model.get_submodule(str(n.target)) for n in model.graph.nodes if n.op == "call_module"]
        return any(not isinstance(m, _VISIBLE) and any(p.dim() >= 2 for p in m.parameters()) for m in leaves)
    return any(
        type(m).__module__.startswith("torch.nn.")
        and not isinstance(m, _VISIBLE)
        and any(p.dim() >= 2 for p in m.parameters(recurse=False))
        for m in model.modules()
    )


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export logs and prints whole graphs to stderr when it fails; the error we raise
    names the failing line instead."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_module(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> fx.GraphModule:
    example = probe_batch(model, input_shape, 2)
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    with _quiet_torch_logs():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    module = program.module()
    assert isinstance(module, fx.GraphModule)
    return module


def _untraceable(what: str, fx_exc: BaseException, export_exc: BaseException | None) -> UnsupportedModelError:
    where = _user_frame(fx_exc) or (_export_location(str(export_exc)) if export_exc is not None else "")
    detail = f"torch.fx: {_first_line(fx_exc)}"
    if export_exc is not None:
        detail += f"; torch.export: {type(export_exc).__name__}: {_first_line(export_exc)}"
    return UnsupportedModelError(
        f"{what} cannot trace the model's forward()" + (f" at {where}" if where else "") + f" ({detail})",
        "data-dependent Python control flow (if/for on tensor values) cannot be traced; "
        "rewrite it with tensor ops or torch.cond, or export a traceable model to .pt2",
    )


def scripted_graph(model: torch.jit.ScriptModule, input_shape: tuple[int, ...] | list[int], batch: int = 1) -> fx.GraphModule:
    """A TorchScript archive as a normalised graph for one batch size (``torch.export``'s
    TorchScript converter; module paths are kept, so its layer table is the source model's)."""
    try:
        from torch._export.converter import TS2EPConverter

        with _quiet_torch_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(model, (probe_batch(model, input_shape, batch),)).convert()
        module = program.module()
        assert isinstance(module, fx.GraphModule)
        return normalize_graph(module)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the TorchScript archive cannot be turned into a graph odekit can inspect ({_first_line(exc)})",
            TORCHSCRIPT_HINT,
        ) from exc


def runnable(model: nn.Module, input_shape: tuple[int, ...] | list[int] | None = None) -> nn.Module:
    """``model`` itself, or for a GraphModule (a ``.pt2`` program's module) its normalised copy:
    a plain GraphModule whose layers are submodules and whose train()/eval() work."""
    return normalize_graph(model, input_shape) if isinstance(model, fx.GraphModule) else model


def run_node(node: fx.Node, env: dict[fx.Node, Any], gm: fx.GraphModule, modules: dict[str, nn.Module]) -> Any:
    """Evaluate one node given its inputs' values in ``env``."""
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return modules[str(node.target)](*args, **kwargs)
    if node.op == "call_function":
        fn: Callable[..., Any] = node.target  # type: ignore[assignment]
        return fn(*args, **kwargs)
    if node.op == "call_method":
        obj, *rest = args
        return getattr(obj, str(node.target))(*rest, **kwargs)
    if node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    raise RuntimeError(f"cannot run node {node.op}")
