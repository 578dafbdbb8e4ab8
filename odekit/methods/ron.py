"""RON: reduced-order networks (thesis ch. 5, Algorithm 1, eq. 5.14-5.20).

A pretrained teacher is traced with ``torch.fx``. For a range of compute layers A..B the part
of the graph from the input of layer A to the end of layer B's block (its BatchNorm,
element-wise monotone activation, max-pool and residual sum) is replaced by a small dense
network that propagates *sampled* activations:

* every activation output ("state") z_k gets a basis V_k (D_k x R_k) from a streaming
  frequent-directions SVD of its outputs over the training samples (never N x D in memory);
* rectangular maxvol picks P_k rows S_k of V_k;
* the pre-activation of state k is an affine function of earlier states (or of the region's
  input x): a_k = sum_j L_kj z_j + b_k (conv/linear, BatchNorm, flatten, pooling-free
  shortcuts, residual sums: eq. 5.16). The student computes
  s_k = psi_k( sum_j S_k L_kj V_j (S_j V_j)^+ s_j + S_k b_k )   (eq. 5.14),
  with W~_0 = S_1 L_1 for the region input (rows of the conv map obtained by a vector-Jacobian
  product, never a dense conv matrix) and L_kj applied to the R_j basis columns reshaped as
  feature maps. BatchNorm (eval mode) is part of the affine map, i.e. folded.
* a max-pooled state samples the k x k inputs of each chosen pooled output and takes the max
  after the activation (monotone activations commute with max);
* the output map V_K (S_K V_K)^+ restores the full activation, which feeds the unchanged rest
  of the teacher.

The student is an ordinary ``nn.Module`` registered as architecture ``ron_student``: its JSON
args (teacher arch/args, cut points, stage sizes) rebuild it, so ``load_model`` reads it back.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import LayerSelectionError, NumericalError, UnsupportedModelError, UsageError
from odekit.linalg.maxvol import rect_maxvol, rect_maxvol_error_factor
from odekit.linalg.rank import RankContext, RankSpec, parse_rank_spec, select_rank
from odekit.linalg.sketch import FrequentDirections, SketchMerge, merge_across_ranks
from odekit.models.graph import ACTIVATION_TARGETS, AFFINE_TARGETS, run_node, runnable, trace_graph
from odekit.models.layers import layer_table, resolve_layers
from odekit.models.registry import build_model, register_arch
from odekit.progress import Progress, silent_if_none
from odekit.streaming.throughput import StageThroughput, ThroughputMeter, measure_matmul_peak

__all__ = [
    "RON_ARCH",
    "RONStudent",
    "RonLayerReport",
    "RonResult",
    "RonSettings",
    "activation_from_config",
    "build_student",
    "conv_rows",
    "fold_batchnorm",
    "trace_model",
]

RON_ARCH = "ron_student"

# ----------------------------------------------------------------------------- op classes

_ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh",
    nn.Softplus: "softplus",
}
_ACTIVATION_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}

_AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.modules.batchnorm._BatchNorm,  # lifted functional batch norms of exported graphs
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
_AFFINE_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.getitem,
    torch.add,
    torch.flatten,
    torch.cat,
    torch.reshape,
    F.pad,
    F.dropout,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
}
_AFFINE_METHODS = {"view", "reshape", "flatten", "contiguous", "add", "squeeze", "unsqueeze", "size"}
_COMPUTE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def activation_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Build an activation module from its JSON config ({"type": "relu", ...})."""
    kind = cfg.get("type", "identity")
    if kind == "identity":
        return nn.Identity()
    if kind == "relu":
        return nn.ReLU()
    if kind == "relu6":
        return nn.ReLU6()
    if kind == "leaky_relu":
        return nn.LeakyReLU(float(cfg.get("negative_slope", 0.01)))
    if kind == "elu":
        return nn.ELU(float(cfg.get("alpha", 1.0)))
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "tanh":
        return nn.Tanh()
    if kind == "hardtanh":
        return nn.Hardtanh(float(cfg.get("min_val", -1.0)), float(cfg.get("max_val", 1.0)))
    if kind == "softplus":
        return nn.Softplus(float(cfg.get("beta", 1.0)), float(cfg.get("threshold", 20.0)))
    raise ValueError(f"unknown activation type '{kind}'")


# ----------------------------------------------------------------------------- fx helpers


def trace_model(model: nn.Module, input_shape: tuple[int, ...] | list[int] | None = None) -> fx.GraphModule:
    """The model's graph (torch.fx, else torch.export; a ``.pt2`` GraphModule as it is),
    normalised so that conv/linear/BatchNorm/max-pool are submodules (``odekit.models.graph``)."""
    return trace_graph(model, input_shape, what="RON")


def _modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def _op_label(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(mods[str(node.target)]).__name__} '{node.target}'"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', str(node.target))} ('{node.name}')"
    if node.op == "call_method":
        return f"method .{node.target}() ('{node.name}')"
    return f"{node.op} '{node.name}'"


def _activation_kind(node: fx.Node, mods: dict[str, nn.Module]) -> dict[str, Any] | None:
    """JSON config of an element-wise monotone activation node, else None."""
    if node.op == "call_module":
        m = mods[str(node.target)]
        kind = _ACTIVATION_MODULES.get(type(m))
        if kind is None:
            return None
        cfg: dict[str, Any] = {"type": kind}
        if isinstance(m, nn.LeakyReLU):
            if m.negative_slope < 0:
                return None
            cfg["negative_slope"] = float(m.negative_slope)
        if isinstance(m, nn.ELU):
            if m.alpha < 0:
                return None
            cfg["alpha"] = float(m.alpha)
        if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
            cfg.update(min_val=float(m.min_val), max_val=float(m.max_val))
        if isinstance(m, nn.Softplus):
            cfg.update(beta=float(m.beta), threshold=float(m.threshold))
        return cfg
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        kind = _ACTIVATION_FUNCTIONS[node.target]
        cfg = {"type": kind}
        if kind == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if not isinstance(slope, float | int) or slope < 0:
                return None
            cfg["negative_slope"] = float(slope)
        if kind == "elu":
            alpha = node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)
            if not isinstance(alpha, float | int) or alpha < 0:
                return None
            cfg["alpha"] = float(alpha)
        return cfg
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return {"type": _ACTIVATION_METHODS[str(node.target)]}
    if node.op == "call_function" and node.target in ACTIVATION_TARGETS:
        return _aten_activation(node, ACTIVATION_TARGETS[node.target])
    return None


def _aten_activation(node: fx.Node, kind: str) -> dict[str, Any] | None:
    """Config of an aten-level activation node; None when its parameters make it non-monotone."""
    extra: list[Any] = list(node.args[1:])
    cfg: dict[str, Any] = {"type": kind}
    try:
        if kind == "leaky_relu":
            cfg["negative_slope"] = float(extra[0]) if extra else 0.01
            return cfg if cfg["negative_slope"] >= 0 else None
        if kind == "elu":
            alpha, scale, in_scale = ([float(v) for v in extra] + [1.0, 1.0, 1.0][len(extra) :])[:3]
            return {"type": "elu", "alpha": alpha} if alpha >= 0 and scale == 1.0 and in_scale == 1.0 else None
        if kind == "hardtanh":
            lo, hi = ([float(v) for v in extra] + [-1.0, 1.0][len(extra) :])[:2]
            return {"type": "relu6"} if (lo, hi) == (0.0, 6.0) else {"type": "hardtanh", "min_val": lo, "max_val": hi}
        if kind == "softplus":
            beta, threshold = ([float(v) for v in extra] + [1.0, 20.0][len(extra) :])[:2]
            return {"type": "softplus", "beta": beta, "threshold": threshold} if beta > 0 else None
    except (TypeError, ValueError):
        return None  # a parameter computed in the graph
    return cfg


def _is_maxpool(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(mods[str(node.target)], nn.MaxPool2d)


def _pool_params(node: fx.Node, mods: dict[str, nn.Module]) -> tuple[int, int]:
    pool = mods[str(node.target)]
    assert isinstance(pool, nn.MaxPool2d)

    def one(v: Any) -> int:
        if isinstance(v, tuple):
            if len(set(v)) != 1:
                raise ValueError
            return int(v[0])
        return int(v)

    try:
        k, s, p, d = one(pool.kernel_size), one(pool.stride), one(pool.padding), one(pool.dilation)
    except ValueError:
        k = s = p = d = -1
    if k < 1 or p != 0 or d != 1 or pool.ceil_mode:
        raise UnsupportedModelError(
            f"RON supports square max-pools without padding/dilation; {_op_label(node, mods)} is not one",
            "choose a layer range that ends before this pool",
        )
    return k, s


def _is_affine(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods[str(node.target)], _AFFINE_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            return bool(mode == "constant" and value in (None, 0, 0.0))
        if node.target is torch.ops.aten.constant_pad_nd.default:
            return (node.args[2] if len(node.args) > 2 else 0) in (0, 0.0)
        if node.target is torch.ops.aten.dropout.default:
            return not (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False))
        return node.target in _AFFINE_FUNCTIONS or node.target in AFFINE_TARGETS
    if node.op == "call_method":
        return node.target in _AFFINE_METHODS
    return node.op == "get_attr"


_run_node = run_node


# ----------------------------------------------------------------------------- region analysis


@dataclass
class _State:
    """One sampled activation: out = pool(act(pre)), basis V, rows S."""

    index: int
    pre: fx.Node  # pre-activation node (affine in sources)
    act: dict[str, Any]  # activation config ({"type": "identity"} when none)
    act_node: fx.Node | None
    pool: fx.Node | None
    out: fx.Node
    sources: list[fx.Node] = field(default_factory=list)  # earlier state outputs or x_in
    affine_nodes: list[fx.Node] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # aliases of compute layers in its affine map


@dataclass
class _Region:
    gm: fx.GraphModule
    x_in: fx.Node
    y_out: fx.Node
    nodes: list[fx.Node]
    states: list[_State]
    shapes: dict[fx.Node, tuple[int, ...]]
    first_layer: int
    last_layer: int


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _record_shapes(
    gm: fx.GraphModule, input_shape: tuple[int, ...], device: torch.device
) -> dict[fx.Node, tuple[int, ...]]:
    mods = _modules(gm)
    env: dict[fx.Node, Any] = {}
    shapes: dict[fx.Node, tuple[int, ...]] = {}
    param = next(iter(gm.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = torch.zeros(2, *input_shape, device=device, dtype=dtype)
            elif node.op == "output":
                break
            else:
                env[node] = _run_node(node, env, gm, mods)
            if isinstance(env[node], Tensor) and env[node].dim() >= 1 and env[node].shape[0] == 2:
                shapes[node] = tuple(env[node].shape[1:])
    return shapes


def analyse_region(
    teacher: nn.Module,
    input_shape: tuple[int, ...],
    layers: str,
    device: torch.device | None = None,
) -> _Region:
    """Trace the teacher and describe the region of compute layers ``layers`` (e.g. "7-16")."""
    device = device or torch.device("cpu")
    teacher = runnable(teacher, input_shape)
    param = next(iter(teacher.parameters()), None)
    # layer_table probes with float32 inputs; give it a float32 copy of other-precision models
    probe = (
        teacher if param is None or param.dtype == torch.float32 else copy.deepcopy(teacher).float()
    )
    summary = layer_table(probe, input_shape)
    chosen = resolve_layers(layers, summary)
    indices = [layer.index for layer in chosen]
    if indices != list(range(indices[0], indices[-1] + 1)):
        raise LayerSelectionError(
            f"RON needs a contiguous range of layers, got {layers}", "give a range such as 3-8"
        )
    for layer in chosen:
        if layer.calls != 1:
            raise UnsupportedModelError(
                f"layer {layer.index} ('{layer.name}') runs {layer.calls} times per forward pass",
                "RON reduces layers that run once",
            )
    gm = trace_model(teacher, input_shape)
    mods = _modules(gm)
    by_target = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    alias_of = {layer.name: layer.alias for layer in summary.layers}
    first_node = by_target.get(chosen[0].name)
    last_node = by_target.get(chosen[-1].name)
    if first_node is None or last_node is None:
        raise UnsupportedModelError("RON cannot find the chosen layers in the traced graph")
    x_in = first_node.args[0]
    if not isinstance(x_in, fx.Node):
        raise UnsupportedModelError(
            f"layer {chosen[0].index} has no tensor input in the traced graph"
        )

    # extend the last layer through its BatchNorm / activation / max-pool / residual sum
    y_out = last_node
    while len(y_out.users) == 1:
        user = next(iter(y_out.users))
        absorbable = (
            (
                user.op == "call_module"
                and isinstance(
                    mods[str(user.target)],
                    nn.modules.batchnorm._BatchNorm | nn.Dropout | nn.Identity,
                )
            )
            or _activation_kind(user, mods) is not None
            or _is_maxpool(user, mods)
            or (user.op == "call_function" and user.target in (operator.add, torch.add, torch.ops.aten.add.Tensor))
            or (user.op == "call_method" and user.target == "add")
        )
        if not absorbable:
            break
        y_out = user

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pre_nodes = _ancestors(x_in) | {x_in}
    region_set = (_ancestors(y_out) | {y_out}) - pre_nodes
    region_set = {n for n in region_set if n.op != "get_attr"}
    nodes = sorted(region_set, key=order.__getitem__)
    label_range = f"{chosen[0].index}-{chosen[-1].index}"

    # every op must be affine, a monotone activation or a max-pool after an activation
    for n in nodes:
        if n.op == "call_module" and isinstance(mods[str(n.target)], _COMPUTE):
            continue
        if _is_affine(n, mods) or _activation_kind(n, mods) is not None or _is_maxpool(n, mods):
            continue
        prev = [
            alias_of.get(str(m.target))
            for m in nodes[: nodes.index(n)]
            if m.op == "call_module" and str(m.target) in alias_of
        ]
        where = (
            f"after layer {prev[-1]}" if prev and prev[-1] else f"before layer {chosen[0].alias}"
        )
        raise UnsupportedModelError(
            f"layer range {label_range} crosses an unsupported op: {_op_label(n, mods)} ({where})",
            "RON handles conv/linear, BatchNorm, element-wise monotone activations, max-pool and residual sums; "
            "choose a range that avoids this op",
        )

    # closure: the region reads only x_in (and constants); the rest reads only y_out
    for n in nodes:
        for inp in n.all_input_nodes:
            if inp not in region_set and inp is not x_in and inp.op != "get_attr":
                raise LayerSelectionError(
                    f"layer range {label_range} is not self-contained: {_op_label(n, mods)} inside it reads "
                    f"'{inp.name}' from before layer {chosen[0].index}",
                    "start the range at the first layer of a residual block (see 'odekit info')",
                )
    for n in gm.graph.nodes:
        if n in region_set or n in pre_nodes or n.op in ("get_attr",):
            continue
        for inp in n.all_input_nodes:
            if (inp in region_set and inp is not y_out) or (inp in pre_nodes and n.op != "output"):
                raise LayerSelectionError(
                    f"layer range {label_range} cuts through a residual connection: {_op_label(n, mods)} after it "
                    f"reads '{inp.name}' from inside or before the range",
                    "end the range at the last layer of a residual block (see 'odekit info')",
                )
            if inp in pre_nodes and n.op == "output":
                raise LayerSelectionError(
                    f"layer range {label_range} does not reach the model output path"
                )

    # states
    states: list[_State] = []
    outs: dict[fx.Node, _State] = {}
    for n in nodes:
        cfg = _activation_kind(n, mods)
        if cfg is not None:
            users = list(n.users)
            pool = (
                users[0]
                if len(users) == 1 and _is_maxpool(users[0], mods) and users[0] in region_set
                else None
            )
            pre = n.args[0]
            assert isinstance(pre, fx.Node)
            st = _State(len(states), pre, cfg, n, pool, pool if pool is not None else n)
            states.append(st)
            outs[st.out] = st
        elif _is_maxpool(n, mods):
            src = n.args[0]
            if (
                isinstance(src, fx.Node)
                and _activation_kind(src, mods) is not None
                and len(src.users) == 1
            ):
                continue  # handled with its activation
            if isinstance(src, fx.Node) and src in outs:
                raise UnsupportedModelError(
                    f"{_op_label(n, mods)} pools an activation that is also used elsewhere",
                    "choose a layer range that ends before this pool",
                )
            st = _State(len(states), src, {"type": "identity"}, None, n, n)  # type: ignore[arg-type]
            states.append(st)
            outs[n] = st
    if y_out not in outs:
        st = _State(len(states), y_out, {"type": "identity"}, None, None, y_out)
        states.append(st)
        outs[y_out] = st
    states.sort(key=lambda s: order[s.out])
    for i, st in enumerate(states):
        st.index = i
    outs = {st.out: st for st in states}

    # affine dependencies of each state's pre-activation
    for st in states:
        seen: set[fx.Node] = set()
        sources: set[fx.Node] = set()
        own = st.pre is st.out  # an un-activated state: its own node is the affine map
        stack = [st.pre] if own or (st.pre not in outs and st.pre is not x_in) else []
        if not own and (st.pre in outs or st.pre is x_in):
            sources.add(st.pre)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if not (
                _is_affine(n, mods)
                or (n.op == "call_module" and isinstance(mods[str(n.target)], _COMPUTE))
            ):
                raise UnsupportedModelError(
                    f"layer range {label_range}: {_op_label(n, mods)} is neither affine nor a sampled activation",
                    "RON supports [conv/linear -> BN -> monotone activation -> max-pool] chains and residual sums",
                )
            for inp in n.all_input_nodes:
                if inp in outs or inp is x_in:
                    sources.add(inp)
                elif inp.op == "get_attr":
                    continue
                else:
                    stack.append(inp)
        st.affine_nodes = sorted(seen, key=order.__getitem__)
        st.sources = sorted(sources, key=order.__getitem__)
        st.layers = [
            alias_of[str(n.target)]
            for n in st.affine_nodes
            if n.op == "call_module" and str(n.target) in alias_of
        ]
        if not st.sources:
            raise UnsupportedModelError(
                f"state '{st.out.name}' does not depend on the region input"
            )
    shapes = _record_shapes(gm, input_shape, device)
    return _Region(gm, x_in, y_out, nodes, states, shapes, chosen[0].index, chosen[-1].index)


# ----------------------------------------------------------------------------- linear algebra


def fold_batchnorm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of conv/linear ``layer`` with eval-mode BatchNorm ``bn`` folded into it."""
    if not isinstance(layer, _COMPUTE) or not isinstance(
        bn, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
    ):
        raise UsageError("fold_batchnorm needs a conv/linear layer and a BatchNorm layer")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError("BatchNorm without running statistics cannot be folded")
    fused = copy.deepcopy(layer)
    with torch.no_grad():
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps
        )
        shift = (
            bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        ) - bn.running_mean * scale
        w = fused.weight
        fused.weight.copy_(w * scale.reshape(-1, *([1] * (w.dim() - 1))))
        old_bias = fused.bias if fused.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = old_bias * scale + shift
        if fused.bias is None:
            fused.bias = nn.Parameter(new_bias.to(w.dtype))
        else:
            fused.bias.copy_(new_bias)
    return fused


def conv_rows(
    layer: nn.Module, in_shape: tuple[int, ...], rows: Tensor, chunk: int = 256
) -> Tensor:
    """Rows ``rows`` (flat output indices) of the linear map of ``layer`` (bias excluded), as a
    (len(rows), prod(in_shape)) matrix, by vector-Jacobian products: no dense matrix."""

    def f(x: Tensor) -> Tensor:
        out = layer(x)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            out = out - bias.reshape(1, -1, *([1] * (out.dim() - 2)))
        return out

    return _vjp_rows(f, in_shape, rows, chunk, next(layer.parameters()))


def _vjp_rows(
    f: Callable[[Tensor], Tensor], in_shape: tuple[int, ...], rows: Tensor, chunk: int, like: Tensor
) -> Tensor:
    out = []
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        x = torch.zeros(
            r.numel(), *in_shape, dtype=like.dtype, device=like.device, requires_grad=True
        )
        with torch.enable_grad():
            y = f(x).reshape(r.numel(), -1)
            cot = torch.zeros_like(y)
            cot[torch.arange(r.numel(), device=y.device), r.to(y.device)] = 1.0
            (g,) = torch.autograd.grad(y, x, cot)
        out.append(g.reshape(r.numel(), -1).detach())
    return (
        torch.cat(out)
        if out
        else torch.zeros(0, math.prod(in_shape), dtype=like.dtype, device=like.device)
    )


def _eval_affine(
    st: _State,
    region: _Region,
    mods: dict[str, nn.Module],
    inputs: dict[fx.Node, Tensor],
    batch: int,
    like: Tensor,
) -> Tensor:
    """Evaluate state ``st``'s pre-activation with the given source values (missing: zero)."""
    env: dict[fx.Node, Any] = {}
    for src in st.sources:
        env[src] = inputs.get(
            src, torch.zeros(batch, *region.shapes[src], dtype=like.dtype, device=like.device)
        )
    for n in st.affine_nodes:
        for inp in n.all_input_nodes:
            if inp.op == "get_attr" and inp not in env:
                env[inp] = _run_node(inp, env, region.gm, mods)
        env[n] = _run_node(n, env, region.gm, mods)
    return env[st.pre]


def _pre_rows(
    st: _State, region: _Region, mods: dict[str, nn.Module], sampled: Tensor
) -> tuple[Tensor, int]:
    """Flat pre-activation positions for sampled state rows (k*k per row for a max-pool)."""
    if st.pool is None:
        return sampled, 1
    k, s = _pool_params(st.pool, mods)
    out_shape = region.shapes[st.out]
    pre_shape = region.shapes[st.pool.args[0]]  # type: ignore[index]
    if len(out_shape) != 3 or len(pre_shape) != 3:
        raise UnsupportedModelError("RON supports max-pools over (C, H, W) feature maps")
    _, ho, wo = out_shape
    _, h, w = pre_shape
    c = sampled // (ho * wo)
    i = (sampled // wo) % ho
    j = sampled % wo
    di = torch.arange(k, device=sampled.device).repeat_interleave(k)
    dj = torch.arange(k, device=sampled.device).repeat(k)
    rows = (
        c[:, None] * (h * w) + (i[:, None] * s + di[None, :]) * w + (j[:, None] * s + dj[None, :])
    )
    return rows.reshape(-1), k * k


# ----------------------------------------------------------------------------- the student


class _Stage(nn.Module):
    """s_k = pool(act(sum_j M_kj s_j + b_k)); sources are -1 (region input) or earlier stages."""

    def __init__(self, rows: int, source_dims: list[int], act: dict[str, Any], group: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(
            nn.Linear(d, rows, bias=(i == 0)) for i, d in enumerate(source_dims)
        )
        self.act = activation_from_config(act)
        self.group = int(group)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        a = self.maps[0](inputs[0])
        for m, x in zip(self.maps[1:], inputs[1:], strict=True):
            a = a + m(x)
        a = self.act(a)
        if self.group > 1:
            a = a.reshape(a.shape[0], -1, self.group).amax(dim=2)
        return a


def _subgraph(gm: fx.GraphModule, start: str | None, end: str | None) -> fx.GraphModule:
    """The teacher's graph from the model input to node ``end`` (``start=None``: the pre-model),
    or from node ``start``, fed as the only input, to the model output (``end=None``: the rest).
    Only the submodules the piece calls are kept, under their teacher names."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(gm.graph.nodes)
    names = {n.name: n for n in nodes}
    if start is None:
        if end not in names:
            raise UnsupportedModelError(f"node '{end}' is not in the traced teacher")
        for n in nodes:
            if n.op == "output":
                break
            env[n] = graph.node_copy(n, lambda m: env[m])
            if n.name == end:
                break
        graph.output(env[names[str(end)]])
    else:
        if start not in names:
            raise UnsupportedModelError(f"node '{start}' is not in the traced teacher")
        started = False
        env[names[start]] = graph.placeholder("z")
        for n in nodes:
            if n.name == start:
                started = True
                continue
            if n.op == "get_attr":
                env[n] = graph.node_copy(n, lambda m: env[m])
                continue
            if not started or n.op == "placeholder":
                continue
            if n.op == "output":
                graph.output(fx.node.map_arg(n.args[0], lambda m: env[m]))
                break
            env[n] = graph.node_copy(n, lambda m: env[m])
    sub = fx.GraphModule(gm, graph)
    sub.graph.eliminate_dead_code()
    sub.delete_all_unused_submodules()
    sub.recompile()
    return sub


class RONStudent(nn.Module):
    """pre (teacher up to the region input) -> dense reduced stages -> output map -> rest."""

    def __init__(
        self,
        teacher_arch: str,
        teacher_args: dict[str, Any],
        input_node: str,
        output_node: str,
        in_dim: int,
        out_shape: list[int],
        stages: list[dict[str, Any]],
        out_rows: int,
        fold_output: bool = False,
        input_shape: list[int] | None = None,
        *,
        graph: fx.GraphModule | None = None,
    ) -> None:
        """``graph``: the teacher's traced graph (copied), for teachers that no registered
        architecture rebuilds (the args then only document the student)."""
        super().__init__()
        if graph is not None:
            gm = copy.deepcopy(graph)
        else:
            teacher = build_model(teacher_arch, teacher_args).eval()
            gm = trace_model(teacher, input_shape)
        self.pre = _subgraph(gm, None, input_node)
        self.rest = _subgraph(gm, output_node, None)
        dims: list[int] = []
        self.sources: list[list[int]] = []
        modules = []
        for cfg in stages:
            src = [int(s) for s in cfg["sources"]]
            src_dims = [in_dim if s < 0 else dims[s] for s in src]
            modules.append(_Stage(int(cfg["rows"]), src_dims, cfg["act"], int(cfg.get("group", 1))))
            dims.append(int(cfg["rows"]) // max(int(cfg.get("group", 1)), 1))
            self.sources.append(src)
        self.stages = nn.ModuleList(modules)
        self.out_shape = [int(v) for v in out_shape]
        self.fold_output = bool(fold_output)
        self.out_map = (
            nn.Identity()
            if fold_output
            else nn.Linear(out_rows, math.prod(self.out_shape), bias=False)
        )

    def train(self, mode: bool = True) -> RONStudent:
        """Fine-tuning keeps the teacher parts' BatchNorm statistics frozen: the reduced layers
        were fitted to the eval-mode activations of the pre-model."""
        super().train(mode)
        if mode:
            for m in [*self.pre.modules(), *self.rest.modules()]:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        h = h.reshape(h.shape[0], -1)
        outs: list[Tensor] = []
        for stage, src in zip(self.stages, self.sources, strict=True):
            outs.append(stage([h if s < 0 else outs[s] for s in src]))
        z = self.out_map(outs[-1])
        z = z.reshape(z.shape[0], *self.out_shape)
        return self.rest(z)


@register_arch(
    RON_ARCH,
    "RON student: teacher pre-layers + dense reduced-order layers + teacher rest",
    None,
    family="ron",
)
def _build_ron_student(**kwargs: Any) -> RONStudent:
    return RONStudent(**kwargs)


# ----------------------------------------------------------------------------- construction


@dataclass(frozen=True)
class RonSettings:
    """Settings of the student construction (validated on creation)."""

    layers: str
    rank: str = "vbmf"
    oversample: float = 1.5
    samples: int | None = None
    sketch_size: int | None = None
    batch_size: int = 256
    sketch_dtype: str = "float64"

    def __post_init__(self) -> None:
        if not self.layers or not str(self.layers).strip():
            raise UsageError("give the layers to reduce", "e.g. --layers 7-16")
        specs = str(self.rank).split(",")
        if any(not part.strip() for part in specs):
            raise UsageError(
                f"cannot read --rank '{self.rank}'",
                "use e.g. vbmf, energy:0.99, factor:4, 32 or 60,40,10",
            )
        for part in specs:
            parse_rank_spec(part)

        if not self.oversample >= 1.0:
            raise UsageError(
                f"--oversample must be >= 1 (P_k >= R_k rows), got {self.oversample}",
                "the thesis uses 1 to 2",
            )
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples must be positive, got {self.samples}")
        if self.sketch_size is not None and self.sketch_size < 2:
            raise UsageError(f"--sketch-size must be >= 2, got {self.sketch_size}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        if self.sketch_dtype not in ("float32", "float64"):
            raise UsageError("sketch dtype must be float32 or float64")

    @property
    def rank_specs(self) -> list[RankSpec]:
        """One spec for every reduced layer, or one spec per reduced layer (comma list)."""
        return [parse_rank_spec(part) for part in str(self.rank).split(",")]


@dataclass
class RonLayerReport:
    """One reduced state (a modified layer's activation)."""

    state: str
    layers: list[str]
    dim: int
    rank: int
    rows: int
    pooled: bool
    sources: list[str]
    singular_values: list[float]  # sketch singular values divided by the largest
    decay: float  # sigma_R / sigma_1
    error_factor: float  # eq. 5.20: sqrt(1 + (D - P) R / (P + 1 - R))
    amplification: float  # measured ||V (S V)^+||_2 = 1 / sigma_min(S V)
    covariance_error: float  # FD bound on ||Z^T Z - B^T B||_2, relative to ||Z||_2^2 (approx.)
    residual_energy: float  # 1 - ||Z V||_F^2 / ||Z||_F^2 estimated from the sketch

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RonResult:
    student: RONStudent
    args: dict[str, Any]
    layers: list[RonLayerReport]
    n_samples: int
    first_layer: int
    last_layer: int
    # issue 15: the activation-streaming stage's rate on this rank, and each state's merge
    throughput: StageThroughput | None = None
    merges: list[SketchMerge] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]


def _state_name(st: _State) -> str:
    return st.out.name


def _default_sketch(dim: int, n: int, spec_rank: int | None, requested: int | None) -> int:
    """Sketch rows: --sketch-size, else max(128, 2R) for a known R, capped by D and N (with
    ell >= min(D, N) the frequent-directions sketch is exact)."""
    if requested is not None:
        return max(2, min(requested, dim))
    base = 128 if spec_rank is None else max(128, 2 * spec_rank)
    return max(2, min(dim, n, base))


def build_student(
    teacher: nn.Module,
    teacher_arch: str,
    teacher_args: dict[str, Any],
    input_shape: tuple[int, ...],
    samples: Iterable[Tensor] | Tensor,
    settings: RonSettings,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    n_samples: int | None = None,
    dist: Distributed | None = None,
) -> RonResult:
    """Algorithm 1: stream the region's activations, choose ranks, sample rows, build weights.

    ``samples``: a (N, *input_shape) tensor or an iterable of input batches (model-input units).
    ``dist`` (several ranks): each rank streams its shard of a tensor ``samples`` (an iterable
    is taken as this rank's shard, ``n_samples`` as the total), the sketches are merged on rank
    0, which chooses ranks and maxvol rows and broadcasts them; every rank gets the same student.
    """
    progress = silent_if_none(progress)
    device = torch.device(device)
    teacher = runnable(teacher, input_shape).to(device).eval()
    region = analyse_region(teacher, tuple(input_shape), settings.layers, device)
    gm = region.gm
    mods = _modules(gm)
    if isinstance(samples, Tensor):
        data = samples
        if settings.samples is not None:
            data = data[: settings.samples]
        n_total = int(data.shape[0])
        if dist is not None:
            data = data[dist.shard(n_total).start : dist.shard(n_total).stop]
        batches: Iterable[Tensor] = (
            data[i : i + settings.batch_size] for i in range(0, data.shape[0], settings.batch_size)
        )
    else:
        batches = samples
        n_total = int(n_samples) if n_samples is not None else -1
    specs = settings.rank_specs
    if len(specs) not in (1, len(region.states)):
        names = ", ".join(f"{st.out.name} ({'+'.join(st.layers) or '-'})" for st in region.states)
        raise UsageError(
            f"--rank lists {len(specs)} ranks but layers {region.first_layer}-{region.last_layer} have "
            f"{len(region.states)} reduced activations: {names}",
            "give one rank for all, or exactly one per reduced activation",
        )
    spec_of = {
        st.index: specs[0] if len(specs) == 1 else specs[i] for i, st in enumerate(region.states)
    }
    state_dims = {st.index: math.prod(region.shapes[st.out]) for st in region.states}
    # integer ranks can be checked before any data is streamed
    for st in region.states:
        spec = spec_of[st.index]
        if spec.name != "fixed":
            continue
        r, d = int(spec.value or 0), state_dims[st.index]
        where = f"layer output '{_state_name(st)}' (layers {', '.join(st.layers) or '-'}, D={d})"
        if r > d:
            hint = f"choose a rank <= {d}"
            if len(specs) == 1 and len(region.states) > 1:
                dims = ", ".join(f"{s.out.name}: D={state_dims[s.index]}" for s in region.states)
                hint += (
                    f"; or give one rank per reduced layer output ({dims}), e.g. --rank 40,40,10"
                )
            raise NumericalError(f"{where}: rank {r} exceeds the layer dimension {d}", hint)
        if n_total > 0 and r > n_total:
            raise NumericalError(
                f"{where}: rank {r} needs at least {r} samples, only {n_total} are used",
                "pass more --samples or choose a smaller rank",
            )
    sketch_dtype = torch.float64 if settings.sketch_dtype == "float64" else torch.float32
    n_hint = n_total if n_total > 0 else 10**9
    sketches: dict[int, FrequentDirections] = {}
    for st in region.states:
        d = state_dims[st.index]
        spec = spec_of[st.index]
        r_hint = int(spec.value) if spec.name == "fixed" and spec.value else None
        if spec.name == "factor" and spec.value:
            r_hint = math.ceil(d / spec.value)
        ell = _default_sketch(d, n_hint, r_hint, settings.sketch_size)
        sketches[st.index] = FrequentDirections(d, ell, device=device, dtype=sketch_dtype)

    # ---- stream the teacher's region activations (one batch at a time)
    targets = {st.out: st.index for st in region.states}
    last = region.y_out
    seen = 0
    # the stage: streaming this rank's shard plus merging the sketches across ranks
    meter = ThroughputMeter("stream activations + merge sketches", device).start()
    with torch.no_grad():
        for xb in progress.track(
            batches,
            None if n_total < 0 else math.ceil(n_total / settings.batch_size),
            "streaming activations",
        ):
            env: dict[fx.Node, Any] = {}
            for node in gm.graph.nodes:
                if node.op == "placeholder":
                    env[node] = xb.to(device)
                elif node.op == "output":
                    break
                else:
                    env[node] = _run_node(node, env, gm, mods)
                if node in targets:
                    sketches[targets[node]].update(env[node].reshape(env[node].shape[0], -1))
                if node is last:
                    break
            seen += int(xb.shape[0])
    meter.add(seen)
    if dist is not None and dist.world_size > 1:
        seen = int(dist.sum_numbers(seen)[0])
    if seen == 0:
        raise NumericalError(
            "no samples were streamed", "pass training data with at least one sample"
        )

    # ---- ranks, bases, rows
    bases: dict[int, Tensor] = {}
    rows: dict[int, Tensor] = {}
    reports: list[RonLayerReport] = []
    merges: list[SketchMerge] = []
    for st in region.states:
        merged, merge = merge_across_ranks(sketches[st.index], dist) if dist else (None, None)
        if merge is not None:
            merges.append(merge)
            sketches[st.index] = merged  # type: ignore[assignment]  # None off rank 0
    meter.stop()
    # rank selection and maxvol run once (rank 0) on the merged sketch, then are broadcast
    for st in region.states if dist is None or dist.is_main else []:
        fd = sketches[st.index]
        d = state_dims[st.index]
        sv = fd.singular_values()
        ctx = RankContext(sv, n_samples=seen, dim=d, total_energy=fd.frobenius_sq)
        try:
            r = select_rank(spec_of[st.index], ctx, max_rank=min(fd.sketch_size, d))
        except NumericalError as exc:
            hint = exc.hint or ""
            if len(specs) == 1 and len(region.states) > 1:
                hint += (
                    "; or give one rank per reduced layer output ("
                    + ", ".join(f"{s.out.name}: D={state_dims[s.index]}" for s in region.states)
                    + "), e.g. --rank 40,40,10"
                )
            raise NumericalError(
                f"layer output '{_state_name(st)}' (layers {', '.join(st.layers) or '-'}, D={d}): {exc.message}",
                hint,
            ) from None
        s_top, v = fd.right_singular(r)
        v = v.to(torch.float64)
        p = min(d, max(r, math.ceil(settings.oversample * r)))
        idx = cast(Tensor, rect_maxvol(v, min_rows=p, max_rows=p))
        bases[st.index] = v
        rows[st.index] = idx
        sv_np = (sv / sv[0]).tolist() if float(sv[0]) > 0 else sv.tolist()
        amp = float(1.0 / torch.linalg.svdvals(v[idx]).min())
        kept = float(s_top.double().pow(2).sum())
        reports.append(
            RonLayerReport(
                state=_state_name(st),
                layers=st.layers,
                dim=d,
                rank=r,
                rows=int(idx.numel()),
                pooled=st.pool is not None,
                sources=["input" if s is region.x_in else s.name for s in st.sources],
                singular_values=[float(x) for x in sv_np],
                decay=float(s_top[-1] / s_top[0]) if float(s_top[0]) > 0 else 0.0,
                error_factor=rect_maxvol_error_factor(d, int(idx.numel()), r),
                amplification=amp,
                covariance_error=fd.delta / max(float(sv[0]) ** 2, 1e-300),
                residual_energy=max(0.0, 1.0 - kept / max(fd.frobenius_sq, 1e-300)),
            )
        )

    if dist is not None and dist.world_size > 1:
        reports = dist.broadcast_object(reports)
        bases, rows = _broadcast_by_state(dist, bases), _broadcast_by_state(dist, rows)
    stream_rate = meter.result(
        _stream_flops(teacher, input_shape, region.last_layer),
        measure_matmul_peak(device, next(teacher.parameters()).dtype),
    )

    # ---- weights (float64, then the teacher's dtype)
    work = copy.deepcopy(gm).to(device=device, dtype=torch.float64).eval()
    wmods = _modules(work)
    wnodes = {n.name: n for n in work.graph.nodes}
    # map analysed nodes onto the float64 copy (same names)
    wregion = _Region(
        work,
        wnodes[region.x_in.name],
        wnodes[region.y_out.name],
        [wnodes[n.name] for n in region.nodes],
        [],
        {wnodes[n.name]: s for n, s in region.shapes.items() if n.name in wnodes},
        region.first_layer,
        region.last_layer,
    )
    for st in region.states:
        wregion.states.append(
            _State(
                st.index,
                wnodes[st.pre.name],
                st.act,
                wnodes[st.act_node.name] if st.act_node is not None else None,
                wnodes[st.pool.name] if st.pool is not None else None,
                wnodes[st.out.name],
                [wnodes[s.name] for s in st.sources],
                [wnodes[n.name] for n in st.affine_nodes],
                st.layers,
            )
        )
    like = torch.zeros((), dtype=torch.float64, device=device)
    out_index = {st.out: st.index for st in wregion.states}
    stage_cfgs: list[dict[str, Any]] = []
    stage_weights: list[list[Tensor]] = []
    stage_bias: list[Tensor] = []
    pinvs: dict[int, Tensor] = {}
    for st in wregion.states:
        v = bases[st.index]
        pinvs[st.index] = torch.linalg.pinv(v[rows[st.index]])  # (R x P)
    for st in wregion.states:
        pre_rows, group = _pre_rows(st, wregion, wmods, rows[st.index])
        pre_rows = pre_rows.to(device)
        with torch.no_grad():
            bias = _eval_affine(st, wregion, wmods, {}, 1, like).reshape(-1)[pre_rows]
        mats: list[Tensor] = []
        srcs: list[int] = []
        for src in st.sources:
            if src is wregion.x_in:
                in_shape = wregion.shapes[src]

                def f(x: Tensor, st: _State = st, src: fx.Node = src) -> Tensor:
                    zero = _eval_affine(st, wregion, wmods, {}, 1, like)
                    return _eval_affine(st, wregion, wmods, {src: x}, x.shape[0], like) - zero

                mats.append(_vjp_rows(f, in_shape, pre_rows, 128, like))
                srcs.append(-1)
            else:
                j = out_index[src]
                vj = bases[j]
                cols = vj.T.reshape(vj.shape[1], *wregion.shapes[src])
                with torch.no_grad():
                    lin = []
                    zero = _eval_affine(st, wregion, wmods, {}, 1, like).reshape(1, -1)
                    for c0 in range(0, cols.shape[0], 64):
                        block = cols[c0 : c0 + 64]
                        y = _eval_affine(st, wregion, wmods, {src: block}, block.shape[0], like)
                        lin.append((y.reshape(block.shape[0], -1) - zero)[:, pre_rows])
                    slv = torch.cat(lin).T  # (P_pre x R_j) = S_k L V_j
                mats.append(slv @ pinvs[j])  # (P_pre x P_j)
                srcs.append(j)
        stage_cfgs.append(
            {
                "rows": int(pre_rows.numel()),
                "sources": srcs,
                "act": st.act,
                "group": group,
                "state": st.out.name,
            }
        )
        stage_weights.append(mats)
        stage_bias.append(bias)

    last_state = wregion.states[-1]
    out_map = bases[last_state.index] @ pinvs[last_state.index]  # D_K x P_K
    d_out = out_map.shape[0]
    fold = (
        last_state.act.get("type") == "identity"
        and last_state.pool is None
        and d_out * sum(m.shape[1] for m in stage_weights[-1])
        <= stage_cfgs[-1]["rows"] * (sum(m.shape[1] for m in stage_weights[-1]) + d_out)
    )
    if fold:
        stage_weights[-1] = [out_map @ m for m in stage_weights[-1]]
        stage_bias[-1] = out_map @ stage_bias[-1]
        stage_cfgs[-1]["rows"] = d_out
    in_dim = math.prod(region.shapes[region.x_in])
    args = {
        "teacher_arch": teacher_arch,
        "teacher_args": teacher_args,
        "input_node": region.x_in.name,
        "output_node": region.y_out.name,
        "in_dim": in_dim,
        "out_shape": list(region.shapes[region.y_out]),
        "stages": [{k: v for k, v in c.items() if k != "state"} for c in stage_cfgs],
        "out_rows": int(rows[last_state.index].numel()),
        "fold_output": bool(fold),
        "input_shape": [int(v) for v in input_shape],
    }
    student = RONStudent(**args, graph=gm)  # type: ignore[arg-type]
    dtype = next(teacher.parameters()).dtype
    with torch.no_grad():
        student.pre.load_state_dict(_sub_state(gm, student.pre), strict=True)
        student.rest.load_state_dict(_sub_state(gm, student.rest), strict=True)
        stages: list[Any] = list(cast(nn.ModuleList, student.stages))
        for stage, mats, bias in zip(stages, stage_weights, stage_bias, strict=True):
            for lin, m in zip(stage.maps, mats, strict=True):
                lin.weight.copy_(m.to(lin.weight.dtype))
            stage.maps[0].bias.copy_(bias.to(stage.maps[0].bias.dtype))
        if not fold:
            out_linear = cast(nn.Linear, student.out_map)
            out_linear.weight.copy_(out_map.to(out_linear.weight.dtype))
    student = student.to(device=device, dtype=dtype).eval()
    return RonResult(
        student, args, reports, seen, region.first_layer, region.last_layer, stream_rate, merges
    )


def _broadcast_by_state(dist: Distributed, tensors: dict[int, Tensor]) -> dict[int, Tensor]:
    """Rank 0's per-state tensors (bases, maxvol rows) on every rank."""
    received = dist.broadcast_tensors({str(k): v for k, v in tensors.items()})
    return {int(k): v for k, v in received.items()}


def _stream_flops(teacher: nn.Module, input_shape: tuple[int, ...], last_layer: int) -> float:
    """FLOPs per sample of the teacher's compute layers up to the streamed region's end."""
    param = next(iter(teacher.parameters()), None)
    probe = (
        teacher if param is None or param.dtype == torch.float32 else copy.deepcopy(teacher).float()
    )
    table = layer_table(probe, tuple(input_shape))
    return float(sum(layer.flops for layer in table.layers if layer.index <= last_layer))


def _sub_state(gm: fx.GraphModule, sub: fx.GraphModule) -> dict[str, Tensor]:
    full = gm.state_dict()
    return {k: full[k].detach().clone() for k in sub.state_dict()}
