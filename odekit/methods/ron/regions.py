"""RON region finding: the graph part between compute layers A..B and its sampled states."""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.errors import LayerSelectionError, UnsupportedModelError
from odekit.methods.ron.ops import (
    _COMPUTE,
    _activation_kind,
    _is_affine,
    _is_maxpool,
    _modules,
    _op_label,
    _run_node,
)
from odekit.models.graph import runnable
from odekit.models.layers import layer_table, resolve_layers
from odekit.models.ron_student import (
    trace_model,
)

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
