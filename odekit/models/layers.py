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

import torch
import torch.fx as fx
from torch import nn

from odekit.errors import LayerSelectionError, UnsupportedModelError
from odekit.models.graph import TORCHSCRIPT_HINT, has_functional_compute, normalize_graph

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


@dataclass(frozen=True)
class ModelSummary:
    layers: list[LayerInfo]
    params: int
    flops: int
    input_shape: list[int]

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "params": self.params,
            "flops": self.flops,
            "input_shape": self.input_shape,
            "flops_convention": "2 x multiply-adds per sample (as torch FlopCounterMode)",
        }


def layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """FLOPs of one call for a single sample (batch size 1)."""
    per_sample_out = output[0].numel()
    if isinstance(module, nn.Linear):
        return 2 * per_sample_out * module.in_features
    conv = module
    assert isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    kernel = math.prod(conv.kernel_size)
    return 2 * per_sample_out * (conv.in_channels // conv.groups) * kernel


def _probe(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """One zero sample on the model's device, in its floating dtype."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.zeros(1, *input_shape)
    return torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)


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


def total_flops(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> int:
    """All matmul/conv FLOPs of one forward pass on one sample, by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _probe(model, input_shape)
    counter = FlopCounterMode(display=False)
    # a training-mode pass would move BatchNorm statistics towards the zero probe
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def layer_table(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> ModelSummary:
    """Run one sample through ``model`` with hooks and list its compute layers.

    A GraphModule that computes conv/linear through functions (a ``.pt2`` program's aten
    graph) is first normalised so its layers are modules named after their weights' owners:
    the table then matches the table of the module it was exported from. A module whose
    forward calls ``F.linear``/``F.conv2d`` on its own weights is listed from its traced graph
    the same way."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "a TorchScript model without odekit metadata cannot be inspected layer by layer",
            TORCHSCRIPT_HINT,
        )
    if isinstance(model, fx.GraphModule) and has_functional_compute(model):
        model = normalize_graph(model, input_shape)
    names = {module: name for name, module in model.named_modules()}
    records: dict[nn.Module, dict[str, object]] = {}
    order: list[nn.Module] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module not in records:
            order.append(module)
            records[module] = {
                "in_shape": list(inputs[0].shape[1:]),
                "out_shape": list(output.shape[1:]),
                "flops": 0,
                "calls": 0,
            }
        rec = records[module]
        rec["flops"] = int(rec["flops"]) + layer_flops(module, output)  # type: ignore[call-overload]
        rec["calls"] = int(rec["calls"]) + 1  # type: ignore[call-overload]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COMPUTE_TYPES)]
    try:
        with eval_mode(model), torch.no_grad():
            model(_probe(model, input_shape))
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"the model does not accept inputs of shape {tuple(input_shape)} ({str(exc).splitlines()[0][:200]})",
            "check the input shape recorded for this checkpoint (or --data)",
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    layers = [
        LayerInfo(
            index=i,
            name=names.get(module, "?"),
            type=type(module).__name__,
            in_shape=records[module]["in_shape"],  # type: ignore[arg-type]
            out_shape=records[module]["out_shape"],  # type: ignore[arg-type]
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            flops=int(records[module]["flops"]),  # type: ignore[call-overload]
            calls=int(records[module]["calls"]),  # type: ignore[call-overload]
        )
        for i, module in enumerate(order, start=1)
    ]
    params = sum(p.numel() for p in model.parameters())
    summary = ModelSummary(layers, params, total_flops(model, input_shape), list(input_shape))
    if not isinstance(model, fx.GraphModule) and summary.flops > sum(layer.flops for layer in layers):
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
        raise LayerSelectionError("empty layer selection", "give e.g. --layers 7-16")
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
