"""The l2 Lipschitz bound of a whole traced network, propagated node by node through its graph.

Every node gets a bound ``L(node)`` of the Lipschitz constant of the map input -> node value:
the input is 1, constants (weights, shapes, sizes) are 0, a layer multiplies its input's bound
by its own constant, an addition sums its inputs' bounds (a residual block ``x + f(x)`` gets
``(1 + L(f)) L(x)``), a concatenation takes the root of their sum of squares, and reshapes,
slices and zero padding keep it. Along a chain this is the product of the layer constants.
BatchNorm (eval) right after a conv/linear layer that nothing else reads is folded into its
weights before the layer is bounded (tighter than bounding both); elsewhere it is a diagonal
scaling with constant max |gamma / sqrt(var + eps)|. Operations without a finite global
constant (LayerNorm, products of two activations as in attention, unknown functions) make the
network not certifiable: `NotCertifiable` names the first one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.errors import UnsupportedModelError
from odekit.linalg.lipschitz import EXACT_SVD_MAX, Bound, ConvSpec, conv_bound, matrix_bound
from odekit.methods.certify.ops import (
    HINT,
    NotCertifiable,
    activation_key,
    module_constant,
    op_name,
    pool_constant,
    reduction_constant,
)
from odekit.models.graph import run_node

IDENTITY_OPS = {
    "flatten", "view", "reshape", "_unsafe_view", "contiguous", "clone", "permute", "transpose", "t",
    "squeeze", "unsqueeze", "dropout", "alias", "detach", "to", "type", "float", "getitem", "chunk",
    "split", "unbind", "narrow", "select", "slice", "pad", "constant_pad_nd", "identity", "unflatten",
    "feature_dropout", "_assert_tensor_metadata", "movedim",
}  # fmt: skip
# ops whose value does not depend on their input's values (shapes only): constants
CONSTANT_OPS = {"ones_like", "zeros_like", "full_like", "empty_like", "new_ones", "new_zeros", "new_full", "new_empty",
                "size", "dim", "numel", "sym_size", "sym_numel"}  # fmt: skip
ADD_OPS = {"add", "iadd", "add_", "sub", "isub", "sub_"}
MUL_OPS = {"mul", "imul", "mul_"}
DIV_OPS = {"truediv", "div", "div_", "itruediv"}
CAT_OPS = {"cat", "concat", "concatenate", "stack"}
MATMUL_OPS = {"matmul", "mm", "bmm", "einsum"}
# max(a, b) element-wise: |max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|), so sqrt(L_a^2 + L_b^2)
ELEMENTWISE_MAX = {"maximum", "minimum", "fmax", "fmin"}
CLAMPS = {"clamp", "clip", "clamp_min", "clamp_max", "threshold"}
REFUSED = {
    "layer_norm": "LayerNorm divides by a per-sample standard deviation (no global Lipschitz constant)",
    "group_norm": "GroupNorm divides by a per-sample standard deviation (no global Lipschitz constant)",
    "instance_norm": "InstanceNorm divides by a per-sample standard deviation (no global Lipschitz constant)",
    "native_layer_norm": "LayerNorm divides by a per-sample standard deviation (no global Lipschitz constant)",
    "scaled_dot_product_attention": "attention multiplies activations together (no global Lipschitz constant)",
    "prod": "multiplies activations together (a polynomial, e.g. a PCE head: no global Lipschitz constant)",
    "pow": "raises activations to a power (no global Lipschitz constant)",
}


@dataclass(frozen=True)
class LayerBound:
    """One bounded node: its constant ``[lower, upper]`` and where it sits."""

    name: str
    kind: str  # conv | linear | batchnorm | activation | pool | ...
    op: str
    bound: Bound
    index: int | None = None  # 1-based compute-layer index (conv/linear), as in every layer table
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "kind": self.kind, "op": self.op,
                "lipschitz_lower": self.bound.lower, "lipschitz_upper": self.bound.upper,
                "method": self.bound.method, **({"note": self.note} if self.note else {})}  # fmt: skip


@dataclass(frozen=True)
class NetworkBound:
    """The propagated network bound (model-input units) and the per-node constants."""

    upper: float
    layers: list[LayerBound]
    output: str  # the node whose margins the certificate uses (logits)
    dropped_output_op: str | None = None  # a final softmax/log-softmax left out (margins are read before it)
    # a final linear layer W and the bound of its input: the margin f_y - f_j is then
    # ||W_y - W_j|| * head_input_bound-Lipschitz, at most the generic sqrt(2) * upper
    head_weight: Tensor | None = None
    head_input_bound: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"lipschitz_upper": self.upper, "layers": [layer.to_dict() for layer in self.layers],
                "logits_node": self.output, "dropped_output_op": self.dropped_output_op,
                "margin_bound": "pairwise last layer" if self.head_weight is not None else "sqrt(2) L"}  # fmt: skip


@dataclass(frozen=True)
class BoundSettings:
    iters: int = 6
    power_iters: int = 30
    fold_batchnorm: bool = True


def record_values(gm: fx.GraphModule, x: Tensor) -> dict[fx.Node, Any]:
    """Every node's value on input ``x`` (one forward pass, no grad)."""
    modules = dict(gm.named_modules())
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                env[node] = env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
            else:
                env[node] = run_node(node, env, gm, modules)
    return env


def _is_tensorish(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point()
    return isinstance(value, list | tuple) and any(_is_tensorish(v) for v in value)


def logits_node(gm: fx.GraphModule) -> tuple[fx.Node, str | None]:
    """The node holding the logits: the output's input, or the input of a final (log-)softmax
    (it keeps the argmax and the margin is read before it)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    if not isinstance(node, fx.Node):
        raise UnsupportedModelError("the traced model does not return one tensor", "return the logits tensor")
    name = op_name(node)
    if name in ("softmax", "log_softmax", "_softmax", "_log_softmax") and isinstance(node.args[0], fx.Node):
        return node.args[0], name
    return node, None


def _bn_folds(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> dict[fx.Node, fx.Node]:
    """conv/linear node -> the eval BatchNorm node that alone reads it."""
    folds: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(str(src.target)), nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)):  # fmt: skip
            folds[src] = node
    return folds


def bn_scale(bn: nn.Module) -> Tensor:
    """The per-channel factor gamma / sqrt(running_var + eps) of an eval BatchNorm."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    var = bn.running_var if bn.running_var is not None else None
    if var is None:
        raise NotCertifiable("a BatchNorm without running statistics normalises by the batch",
                             "certify needs eval-mode BatchNorm with running statistics")  # fmt: skip
    scale = 1.0 / torch.sqrt(var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    return scale


def folded_weight(layer: nn.Module, bn: nn.Module | None) -> Tensor:
    """The layer's weight with a following BatchNorm's scale folded into its output channels."""
    weight = layer.weight
    assert isinstance(weight, Tensor)
    w = weight.detach().double()
    if bn is None:
        return w
    scale = bn_scale(bn)
    return w * scale.view(-1, *([1] * (w.dim() - 1)))


def layer_bound(layer: nn.Module, weight: Tensor, in_shape: tuple[int, ...], settings: BoundSettings) -> Bound:
    """The spectral-norm interval of a conv or linear layer with weight ``weight``."""
    if isinstance(layer, nn.Linear):
        return matrix_bound(weight, settings.iters, settings.power_iters)
    assert isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    if isinstance(layer.padding, str):
        raise NotCertifiable(f"conv padding '{layer.padding}' was not resolved by tracing", "use integer padding")
    spatial = in_shape[1:]
    pads = tuple(int(p) for p in layer.padding)
    spec = ConvSpec(tuple(spatial), tuple(layer.stride), tuple((p, p) for p in pads), tuple(layer.dilation),
                    layer.groups, layer.padding_mode)  # fmt: skip
    return conv_bound(weight, spec, settings.iters, settings.power_iters, dense_max=EXACT_SVD_MAX)


Handler = Callable[[fx.Node, list[float], dict[fx.Node, Any]], tuple[float, LayerBound | None]]


class Propagation:
    """One pass over the graph computing every node's bound (module docstring)."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any], settings: BoundSettings,
                 indices: dict[str, int]) -> None:  # fmt: skip
        self.gm = gm
        self.values = values
        self.settings = settings
        self.indices = indices
        self.modules = dict(gm.named_modules())
        self.folds = _bn_folds(gm, self.modules) if settings.fold_batchnorm else {}
        self.folded = set(self.folds.values())
        self.bounds: dict[fx.Node, float] = {}
        self.layers: list[LayerBound] = []

    def run(self, logits: fx.Node) -> float:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                break
            self.bounds[node] = self._node(node)
            if node is logits:
                break
        return self.bounds[logits]

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.bounds.get(a, 0.0) > 0.0]

    def _node(self, node: fx.Node) -> float:
        if node.op == "placeholder":
            return 1.0 if _is_tensorish(self.values.get(node)) else 0.0
        if node.op == "get_attr" or not _is_tensorish(self.values.get(node)):
            return 0.0
        live = self._inputs(node)
        if not live or op_name(node) in CONSTANT_OPS:
            return 0.0  # a constant subexpression
        if node.op == "call_module":
            return self._module(node, live)
        return self._function(node, live)

    def _add(self, node: fx.Node, kind: str, op: str, bound: Bound, note: str = "", index: int | None = None) -> None:
        self.layers.append(LayerBound(str(node.target) if node.op == "call_module" else node.name, kind, op, bound,
                                      index, note))  # fmt: skip

    def _module(self, node: fx.Node, live: list[fx.Node]) -> float:
        module = self.modules[str(node.target)]
        src = self.bounds[live[0]]
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            bn_node = self.folds.get(node)
            bn = self.modules[str(bn_node.target)] if bn_node is not None else None
            in_value = self.values[node.args[0]]  # type: ignore[index]
            bound = layer_bound(module, folded_weight(module, bn), tuple(in_value.shape[1:]), self.settings)
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            note = f"BatchNorm {bn_node.target} folded in" if bn_node is not None else ""
            self._add(node, kind, type(module).__name__, bound, note, self.indices.get(str(node.target)))
            return src * bound.upper
        if node in self.folded:
            return src
        in_value = self.values[node.args[0]] if isinstance(node.args[0], fx.Node) else None
        kind, constant = module_constant(module, in_value, str(node.target))
        if kind != "reshape":
            self._add(node, kind, type(module).__name__, Bound(constant, constant, "closed form"))
        return src * constant

    def _function(self, node: fx.Node, live: list[fx.Node]) -> float:
        name = op_name(node)
        bounds = [self.bounds[n] for n in live]
        if name in REFUSED:
            raise NotCertifiable(f"'{node.name}' ({name}): {REFUSED[name]}", HINT)
        if name in IDENTITY_OPS:
            return max(bounds)
        if name in ADD_OPS:
            return self._sum(node, bounds)
        if name in CAT_OPS or (name in ELEMENTWISE_MAX | {"max", "min"} and len(bounds) > 1):
            return math.sqrt(sum(b * b for b in bounds))
        if name in ELEMENTWISE_MAX or name in CLAMPS:
            return bounds[0]  # max(x, c), clamp(x, lo, hi): 1-Lipschitz in x
        if name in MUL_OPS or name in DIV_OPS or name == "neg":
            return self._scale(node, name, live, bounds)
        if name in MATMUL_OPS:
            return self._matmul(node, name, live, bounds)
        if name in ("index", "index_select") and len(live) == 1:
            return bounds[0] * self._copies(node, name)
        key = activation_key(node, self.values)
        if key is not None:
            const = key[1]
            self._add(node, "activation", key[0], Bound(const, const, "closed form"))
            return bounds[0] * const
        pooled = pool_constant(node, self.values) if name else None
        if pooled is None:
            pooled = reduction_constant(node, self.values)
        if pooled is not None:
            self._add(node, "pool", name, Bound(pooled, pooled, "closed form"))
            return bounds[0] * pooled
        raise NotCertifiable(f"'{node.name}' ({name or node.target}) has no known Lipschitz constant", HINT)

    def _sum(self, node: fx.Node, bounds: list[float]) -> float:
        alpha = node.kwargs.get("alpha", 1)
        if len(bounds) == 2 and isinstance(alpha, int | float):
            return bounds[0] + abs(float(alpha)) * bounds[1]
        return sum(bounds)

    def _matmul(self, node: fx.Node, name: str, live: list[fx.Node], bounds: list[float]) -> float:
        """``x @ W`` or ``W @ x`` with a constant 2-D ``W``: its spectral norm."""
        consts = [self.values[a] for a in node.all_input_nodes if a not in live]
        if len(live) > 1 or name == "einsum" or len(consts) != 1 or consts[0].dim() != 2:
            raise NotCertifiable(f"'{node.name}' ({name}) multiplies two activations (attention or gating: no "
                                 "global Lipschitz constant)", HINT)  # fmt: skip
        bound = matrix_bound(consts[0], self.settings.iters, self.settings.power_iters)
        self._add(node, "linear", name, bound)
        return bounds[0] * bound.upper

    def _copies(self, node: fx.Node, name: str) -> float:
        """Indexing with one integer index tensor: sqrt(most repeats of one index) (a selection
        that may copy entries)."""
        picks = [node.args[2]] if name == "index_select" else [a for a in node.args[1] if a is not None]  # type: ignore[union-attr]
        index = self.values.get(picks[0]) if len(picks) == 1 and isinstance(picks[0], fx.Node) else None
        if not isinstance(index, Tensor) or index.is_floating_point() or index.dtype == torch.bool:
            raise NotCertifiable(f"'{node.name}' ({name}) indexes in a way certify does not bound", HINT)
        counts = torch.unique(index.reshape(-1), return_counts=True)[1]
        return math.sqrt(float(counts.max())) if counts.numel() else 0.0

    def _scale(self, node: fx.Node, name: str, live: list[fx.Node], bounds: list[float]) -> float:
        if len(live) > 1 or (name in DIV_OPS and node.args and node.args[0] not in live):
            raise NotCertifiable(f"'{node.name}' ({name}) multiplies or divides two activations (attention or "
                                 "gating: no global Lipschitz constant)", HINT)  # fmt: skip
        if name == "neg":
            return bounds[0]
        other = next((a for a in node.args if a is not live[0]), 1.0)
        value = self.values[other] if isinstance(other, fx.Node) else other
        mags = torch.as_tensor(value, dtype=torch.float64).abs()
        factor = float(mags.max()) if name in MUL_OPS else 1.0 / float(mags.min()) if float(mags.min()) > 0 else math.inf
        if not math.isfinite(factor):
            raise NotCertifiable(f"'{node.name}' divides by zero", HINT)
        return bounds[0] * factor


def network_bound(gm: fx.GraphModule, x: Tensor, settings: BoundSettings, indices: dict[str, int]) -> NetworkBound:
    """Propagate bounds through ``gm`` evaluated on the example batch ``x`` (model-input units)."""
    values = record_values(gm, x)
    logits, dropped = logits_node(gm)
    prop = Propagation(gm, values, settings, indices)
    upper = prop.run(logits)
    if upper <= 0.0:
        raise NotCertifiable("the logits do not depend on the input", "certify needs a classifier of its input")
    head = prop.modules.get(str(logits.target)) if logits.op == "call_module" else None
    if isinstance(head, nn.Linear) and isinstance(logits.args[0], fx.Node) and logits.args[0] in prop.bounds:
        return NetworkBound(upper, prop.layers, logits.name, dropped, folded_weight(head, None),
                            prop.bounds[logits.args[0]])  # fmt: skip
    return NetworkBound(upper, prop.layers, logits.name, dropped)
