"""Clean-ups of exported programs for ``odekit.models.graph``: in-place ops become out-of-place,
batch-size queries are re-read next to the reshape that needs them, input guards are dropped and
the pytree output is unwrapped to one tensor."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from odekit.errors import UnsupportedModelError
from odekit.models.graph_ops import _SYM_SIZE, aten


def _functionalise(node: fx.Node) -> None:
    """relu_ / add_ -> relu / add when the mutated tensor has no other reader."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return
    packet = target.overloadpacket.__name__
    if not packet.endswith("_") or packet.startswith("_"):
        return
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or len(first.users) != 1:
        return
    functional = getattr(aten, packet[:-1], None)
    overload = getattr(functional, target._overloadname, None) if functional is not None else None
    if overload is not None:
        node.target = overload


def _relocate_batch_sizes(gm: fx.GraphModule) -> None:
    """sym_size(a, 0) read early for a later ``view(t, [B, ...])``: read it from t instead, when
    the exported shapes say t has the same leading size."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _SYM_SIZE:
            continue
        source, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        if dim != 0 or not isinstance(source, fx.Node):
            continue
        src_val = source.meta.get("val")
        for user in list(node.users):
            tensor = user.args[0] if user.args else None
            if not isinstance(tensor, fx.Node) or tensor is source:
                continue
            val = tensor.meta.get("val")
            if not isinstance(val, Tensor) or not isinstance(src_val, Tensor) or val.dim() == 0:
                continue
            if str(val.shape[0]) != str(src_val.shape[0]):
                continue
            with graph.inserting_before(user):
                local = graph.call_function(_SYM_SIZE, (tensor, 0))
                local.meta["val"] = node.meta.get("val")
            user.replace_input_with(node, local)
        if not node.users:
            graph.erase_node(node)


def _drop_guards_and_unwrap(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule (default codegen) with one tensor input and one tensor output."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"the model's graph takes {len(placeholders)} inputs; odekit handles models with one input tensor",
            "wrap the model so that forward(x) takes one tensor",
        )
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)
            if hasattr(gm, str(node.target)):
                delattr(gm, str(node.target))
    if info is None:
        return gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            flat = node.args[0]
            outs = list(flat) if isinstance(flat, tuple | list) else [flat]
            if len(outs) != 1 or not isinstance(outs[0], fx.Node):
                raise UnsupportedModelError(
                    f"the exported program returns {len(outs)} values; odekit handles models with one output tensor",
                    "export a wrapper whose forward returns the logits only",
                )
            graph.output(env[outs[0]])
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph)
