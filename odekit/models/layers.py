"""Layer addressing: a table of compute layers (conv/linear) and a resolver for user specs.

Indices are 1-based over conv and linear modules in the order the forward pass first calls
them. FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add counts as 2
FLOPs, bias additions, activations, normalisation and pooling are not counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from odekit.errors import LayerSelectionError, UnsupportedModelError
from odekit.models.graph import (
    has_functional_compute,
    hidden_compute,
    normalize_graph,
    scripted_graph,
    trace_graph,
)

COMPUTE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerInfo:
    index: int
    name: str
    type: str
    in_shape: list[int]
    out_shape: list[int]
    params: int
    flops: int
    calls: int = 1

    @property
    def alias(self) -> str:
        return f"{'fc' if self.type == 'Linear' else 'conv'}{self.index}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# the FLOPs a table's total counts beyond its rows
OTHER_OPS = "matmuls outside conv/linear layers: attention scores and attention-weighted values"


@dataclass(frozen=True)
class ModelSummary:
    layers: list[LayerInfo]
    params: int
    flops: int
    input_shape: list[int]

    @property
    def layer_flops(self) -> int:
        """FLOPs of the rows (every call of every conv/linear layer)."""
        return sum(layer.flops for layer in self.layers)

    @property
    def other_flops(self) -> int:
        """What the total counts beyond the rows: ``layer_flops + other_flops == flops``."""
        return self.flops - self.layer_flops

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "params": self.params,
            "flops": self.flops,
            "layer_flops": self.layer_flops,
            "other_flops": self.other_flops,
            "other_ops": OTHER_OPS,
            "input_shape": self.input_shape,
            "flops_convention": "2 x multiply-adds per sample (as torch FlopCounterMode)",
        }


def layer_flops(module: nn.Module, output: torch.Tensor, batch: int | None = None) -> int:
    """FLOPs of one call per sample: of ``output[0]`` (batch-first), or of ``output`` divided by
    ``batch`` wherever the batch dimension sits (attention projections see (L, N, E))."""
    per_sample_out = output[0].numel() if batch is None else output.numel() // batch
    if isinstance(module, nn.Linear):
        return 2 * per_sample_out * module.in_features
    conv = module
    assert isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    kernel = math.prod(conv.kernel_size)
    return 2 * per_sample_out * (conv.in_channels // conv.groups) * kernel


def _probe(model: nn.Module, input_shape: tuple[int, ...] | list[int], batch: int = 1) -> torch.Tensor:
    """``batch`` zero samples on the model's device, in its floating dtype."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.zeros(batch, *input_shape)
    return torch.zeros(batch, *input_shape, device=param.device, dtype=param.dtype)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, the previous mode after it. A ``torch.export`` program's
    module refuses train()/eval(): its graph is fixed to the (eval) mode it was traced in."""
    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def countable_attention() -> Iterator[None]:
    """Attention as plain matmuls: ``nn.MultiheadAttention``'s fused fast path and the fused
    scaled-dot-product kernels are invisible to FlopCounterMode; the math kernel is not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def total_flops(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> int:
    """All matmul/conv FLOPs of one forward pass on one sample (attention included), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _probe(model, input_shape)
    counter = FlopCounterMode(display=False)
    # a training-mode pass would move BatchNorm statistics towards the zero probe
    with eval_mode(model), torch.no_grad(), countable_attention(), counter:
        model(x)
    return int(counter.get_total_flops())


def _table_model(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> nn.Module:
    """The module whose conv/linear submodules are the rows: a normalised graph for a ``.pt2``
    program, a TorchScript archive and a model whose attention holds its own weight matrices
    (so every format of one model gives one table), else the model itself."""
    if isinstance(model, torch.jit.ScriptModule):
        return scripted_graph(model, input_shape)
    if isinstance(model, fx.GraphModule):
        return normalize_graph(model, input_shape) if has_functional_compute(model) else model
    if hidden_compute(model):
        try:
            return trace_graph(model, input_shape, what="the layer table")
        except UnsupportedModelError:  # untraceable: the module table stands
            return model
    return model


def _hook_pass(model: nn.Module, input_shape: tuple[int, ...] | list[int], batch: int) -> dict[nn.Module, dict[str, Any]]:
    """Full input/output shapes, per-sample FLOPs and calls of every conv/linear module."""
    records: dict[nn.Module, dict[str, Any]] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        rec = records.setdefault(module, {"in": list(inputs[0].shape), "out": list(output.shape), "flops": 0, "calls": 0})
        rec["flops"] += layer_flops(module, output, batch)
        rec["calls"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COMPUTE_TYPES)]
    try:
        with eval_mode(model), torch.no_grad(), countable_attention():
            model(_probe(model, input_shape, batch))
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"the model does not accept inputs of shape {tuple(input_shape)} ({str(exc).splitlines()[0][:200]})",
            "check the input shape recorded for this checkpoint (or `data`)",
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return records


def _per_sample(one: list[int], two: list[int]) -> list[int]:
    """A shape without its batch dimension, from the shapes at batch 1 and 2: the dimension that
    doubles is dropped when it is the batch alone, kept when it merges batch and tokens."""
    grown = [d for d, (a, b) in enumerate(zip(one, two, strict=False)) if b == 2 * a and a > 0]
    if len(one) != len(two) or len(grown) != 1:
        return one[1:]
    d = grown[0]
    return one[:d] + one[d + 1 :] if one[d] == 1 else list(one)


def layer_table(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> ModelSummary:
    """Run one sample through ``model`` with hooks and list its compute layers.

    A GraphModule that computes conv/linear through functions (a ``.pt2`` program's aten
    graph), a TorchScript archive and a model whose attention computes with its own weight
    matrices are first turned into a normalised graph whose layers are modules named after their
    weights' owners (``...self_attention.in_proj``): the table is then the same whatever the
    format. A module whose forward calls ``F.linear``/``F.conv2d`` on its own weights is listed
    from its traced graph the same way. ``flops`` counts every matmul (attention's too); what the
    rows do not hold is ``other_flops``."""
    source, model = model, _table_model(model, input_shape)
    names = {module: name for name, module in model.named_modules()}
    records = _hook_pass(model, input_shape, 1)
    if any(rec["in"][:1] != [1] or rec["out"][:1] != [1] for rec in records.values()):
        # a layer sees the batch elsewhere than in dim 0 (attention's (L, N, E)): find it
        # (a TorchScript graph is converted for one batch size, so once more for batch 2)
        other = scripted_graph(source, input_shape, 2) if isinstance(source, torch.jit.ScriptModule) else model
        other_names = {module: name for name, module in other.named_modules()}
        twice = {other_names[m]: rec for m, rec in _hook_pass(other, input_shape, 2).items()}
        for module, rec in records.items():
            rec["in_shape"] = _per_sample(rec["in"], twice[names[module]]["in"])
            rec["out_shape"] = _per_sample(rec["out"], twice[names[module]]["out"])
    layers = [
        LayerInfo(
            index=i,
            name=names.get(module, "?"),
            type=type(module).__name__,
            in_shape=rec.get("in_shape", rec["in"][1:]),
            out_shape=rec.get("out_shape", rec["out"][1:]),
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            flops=int(rec["flops"]),
            calls=int(rec["calls"]),
        )
        for i, (module, rec) in enumerate(records.items(), start=1)
    ]
    params = sum(p.numel() for p in source.parameters())  # a converted TorchScript graph holds some as buffers
    summary = ModelSummary(layers, params, total_flops(model, input_shape), list(input_shape))
    if not isinstance(model, fx.GraphModule) and summary.other_flops > 0:
        # conv/matmul FLOPs outside conv/linear modules: F.conv2d(x, self.w)-style layers,
        # which the traced graph turns into modules (the layers RON and ASNet then address)
        lifted = _functional_layers_graph(model, input_shape)
        if lifted is not None:
            return layer_table(lifted, input_shape)
    return summary


def _functional_layers_graph(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> fx.GraphModule | None:
    """The normalised fx graph of a model with functional conv/linear layers, if it traces."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # untraceable: the module table stands
        return None
    if not has_functional_compute(gm):
        return None
    try:
        return normalize_graph(gm, input_shape)
    except UnsupportedModelError:
        return None


_RANGE = re.compile(r"^\s*([^\s,]+?)\s*-\s*([^\s,]+)\s*$")


def _resolve_one(token: str, layers: list[LayerInfo]) -> int:
    """Position (0-based in ``layers``) of an index, alias (conv7/fc2) or module name."""
    token = token.strip()
    if re.fullmatch(r"\d+", token):
        index = int(token)
        if 1 <= index <= len(layers):
            return index - 1
        raise LayerSelectionError(
            f"layer index {index} is out of range: the model has {len(layers)} compute layers",
            "run 'odekit info CHECKPOINT' to see the layer table",
        )
    for pos, layer in enumerate(layers):
        if token.lower() == layer.alias or token == layer.name:
            return pos
    match = re.fullmatch(r"(conv|fc|linear)(\d+)", token.lower())
    if match:
        index = int(match.group(2))
        if 1 <= index <= len(layers):
            actual = layers[index - 1]
            raise LayerSelectionError(
                f"layer {index} is {actual.type} '{actual.name}' (alias {actual.alias}), not {match.group(1)}",
                "run 'odekit info CHECKPOINT' to see the layer table",
            )
    raise LayerSelectionError(
        f"unknown layer '{token}'",
        "use 1-based indices (7, 7-16), aliases (conv7-conv16, fc2) or module names from 'odekit info'",
    )


def resolve_layers(spec: str, summary: ModelSummary | list[LayerInfo]) -> list[LayerInfo]:
    """Resolve '7-16', '5', 'conv7-conv16', 'features.0', or comma lists of these."""
    layers = summary.layers if isinstance(summary, ModelSummary) else summary
    if not layers:
        raise LayerSelectionError("the model has no conv or linear layers", "odekit addresses conv/linear layers only")
    if not spec or not spec.strip():
        raise LayerSelectionError("empty layer selection", "give e.g. `layers` 7-16")
    chosen: list[int] = []
    for part in spec.split(","):
        match = _RANGE.match(part)
        if match and not part.strip().lstrip("-").isdigit():
            first, last = _resolve_one(match.group(1), layers), _resolve_one(match.group(2), layers)
            if last < first:
                raise LayerSelectionError(f"layer range '{part.strip()}' runs backwards", "write the lower layer first")
            chosen.extend(range(first, last + 1))
        else:
            chosen.append(_resolve_one(part, layers))
    return [layers[pos] for pos in sorted(set(chosen))]
