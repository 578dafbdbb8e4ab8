"""Split a model's graph after a compute layer into a pre-model and a post-model.

The cut is placed after the layer's node and the parameter-free / normalisation ops that only
it feeds (BatchNorm, activation, pooling, residual sum whose other input is already computed).
Everything computed up to there that later nodes still read is the cut's *frontier*: usually
one tensor, but inside a residual block also the block input the skip connection carries.
The pre-model returns the frontier (one tensor as it is, several flattened and concatenated);
the post-model takes that and runs the rest of the graph, so ``post(pre(x)) == model(x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.errors import LayerSelectionError, UnsupportedModelError
from odekit.models.graph import probe_batch, run_node, trace_graph
from odekit.models.layers import COMPUTE_TYPES, LayerInfo, ModelSummary, layer_table


@dataclass(frozen=True)
class GraphCut:
    """The end node of a cut and its frontier (graph nodes, in order, with per-sample shapes).

    ``derived`` names the nodes the post-model reads that do not cross the cut: sizes read from
    tensors (the batch size of a dynamic export, ``x.size(0)``), recomputed from the tensors
    that do cross it, and values that do not depend on the input, recomputed as they are."""

    layer: LayerInfo
    end: str
    frontier: list[str]
    shapes: list[list[int]]
    derived: tuple[str, ...] = ()

    @property
    def features(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def out_shape(self) -> list[int]:
        return list(self.shapes[0]) if len(self.shapes) == 1 else [self.features]


# Two probe batch sizes: a size read from a tensor is constant or k x batch; comparing the
# two runs tells which, so the far side of a cut can recompute it from its own batch size.
_PROBES = (2, 3)


def _batch_scaled(small: Any, large: Any) -> Any:
    """A size's value as a function of the batch: int (constant), ('batch', k), a tuple of
    these for a shape, or None when it is neither."""
    if isinstance(small, tuple | list | torch.Size) and isinstance(large, tuple | list | torch.Size):
        if len(small) != len(large):
            return None
        parts = [_batch_scaled(a, b) for a, b in zip(small, large, strict=True)]
        return None if any(p is None for p in parts) else tuple(parts)
    if not isinstance(small, int | torch.SymInt) or not isinstance(large, int | torch.SymInt):
        return None
    a, b = int(small), int(large)
    if a == b:
        return a
    k, rest = divmod(a, _PROBES[0])
    return ("batch", k) if rest == 0 and k * _PROBES[1] == b else None


def _scaled_value(batch: int, form: Any) -> Any:
    """The value a `_batch_scaled` form takes at ``batch``."""
    if isinstance(form, tuple) and form and form[0] == "batch":
        return int(form[1]) * batch
    if isinstance(form, tuple):
        return tuple(_scaled_value(batch, f) for f in form)
    return form


def _resize(batch: int, form: Any) -> Any:
    value = _scaled_value(batch, form)
    return torch.Size(value) if isinstance(value, tuple) else value


class GraphSplitter:
    """A traced model (``odekit.models.graph.trace_graph``) that can be cut at any compute layer."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | list[int], what: str = "ASNet") -> None:
        self.input_shape = tuple(input_shape)
        self.gm = trace_graph(model, self.input_shape, what=what)
        self.summary: ModelSummary = layer_table(self.gm, self.input_shape)
        self.nodes = list(self.gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.values = self._probe(_PROBES[0])
        self.values_large = self._probe(_PROBES[1])
        self.dependent = self._input_dependent()

    def _probe(self, batch: int) -> dict[fx.Node, Any]:
        modules = dict(self.gm.named_modules())
        env: dict[fx.Node, Any] = {}
        with torch.no_grad():
            for node in self.nodes:
                if node.op == "placeholder":
                    env[node] = probe_batch(self.gm, self.input_shape, batch)
                elif node.op != "output":
                    env[node] = run_node(node, env, self.gm, modules)
        return env

    def _input_dependent(self) -> set[fx.Node]:
        out: set[fx.Node] = set()
        for node in self.nodes:
            if node.op == "placeholder" or any(n in out for n in node.all_input_nodes):
                out.add(node)
        return out

    def _is_compute(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.gm.get_submodule(str(node.target)), COMPUTE_TYPES)

    def layer_node(self, layer: LayerInfo) -> fx.Node:
        for node in self.nodes:
            if node.op == "call_module" and str(node.target) == layer.name:
                return node
        raise UnsupportedModelError(f"layer {layer.index} ('{layer.name}') is not a node of the traced graph")

    def end_node(self, layer: LayerInfo) -> fx.Node:
        """The layer's node extended through the ops that only it feeds."""
        end = self.layer_node(layer)
        while len(end.users) == 1:
            user = next(iter(end.users))
            if user.op in ("output", "placeholder") or self._is_compute(user):
                break
            others = [n for n in user.all_input_nodes if n is not end and n.op != "get_attr"]
            if any(self.order[n] > self.order[end] for n in others):
                break
            if not isinstance(self.values.get(user), Tensor):
                break
            end = user
        return end

    def _crosses(self, node: fx.Node) -> bool:
        """A per-sample tensor: batch-sized along dim 0 at both probe sizes."""
        small, large = self.values.get(node), self.values_large.get(node)
        return (
            isinstance(small, Tensor) and isinstance(large, Tensor) and small.dim() >= 1
            and small.shape[0] == _PROBES[0] and large.shape[0] == _PROBES[1]
        )  # fmt: skip

    def _derivable(self, node: fx.Node) -> bool:
        """Recomputable on the far side: independent of the input, or a size k x batch / constant."""
        if node not in self.dependent:
            return True
        return _batch_scaled(self.values.get(node), self.values_large.get(node)) is not None

    def cut_at(self, layer: LayerInfo, end: fx.Node | None = None) -> GraphCut:
        end = end if end is not None else self.end_node(layer)
        limit = self.order[end]
        frontier, derived = [], []
        for node in self.nodes[: limit + 1]:
            if node.op == "get_attr" or not any(self.order[u] > limit for u in node.users):
                continue
            if node in self.dependent and self._crosses(node):
                frontier.append(node)
            elif self._derivable(node):
                derived.append(node)
            else:
                value = self.values.get(node)
                what = (
                    "a tensor whose first dimension is not the batch, as inside attention"
                    if isinstance(value, Tensor)
                    else f"{type(value).__name__}, not a per-sample tensor"
                )
                raise UnsupportedModelError(
                    f"the cut after layer {layer.index} ('{layer.name}') would pass '{node.name}' ({what}) "
                    "to the post-model",
                    "cut at a block boundary (e.g. a block's last layer; 'odekit info' lists the layers)",
                )
        if not frontier:
            raise LayerSelectionError(f"nothing follows layer {layer.index}", "cut at an earlier layer")
        shapes = [list(self.values[n].shape[1:]) for n in frontier]
        return GraphCut(layer, end.name, [n.name for n in frontier], shapes, tuple(n.name for n in derived))

    def cut_by_name(self, layer: LayerInfo, end: str) -> GraphCut:
        if end not in self.by_name:
            raise UnsupportedModelError(f"node '{end}' is not in the traced graph of the teacher")
        return self.cut_at(layer, self.by_name[end])

    def pre_model(self, cut: GraphCut) -> fx.GraphModule:
        """Input -> frontier (one tensor, or the flattened tensors concatenated)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        limit = self.order[self.by_name[cut.end]]
        for node in self.nodes[: limit + 1]:
            env[node] = graph.node_copy(node, lambda n: env[n])
        outs = [env[self.by_name[name]] for name in cut.frontier]
        if len(outs) == 1:
            graph.output(outs[0])
        else:
            flat = [graph.call_method("flatten", (o, 1)) for o in outs]
            graph.output(graph.call_function(torch.cat, (flat, 1)))
        return _module(self.gm, graph)

    def post_model(self, cut: GraphCut) -> fx.GraphModule:
        """Frontier (as the pre-model returns it) -> the model output."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        z = graph.placeholder("z")
        limit = self.order[self.by_name[cut.end]]
        if len(cut.frontier) == 1:
            env[self.by_name[cut.frontier[0]]] = z
        else:
            start = 0
            for name, shape in zip(cut.frontier, cut.shapes, strict=True):
                size = math.prod(shape)
                part = graph.call_method("narrow", (z, 1, start, size))
                env[self.by_name[name]] = graph.call_method("reshape", (part, (-1, *shape)))
                start += size
        self._recompute_derived(graph, env, z, cut)
        for node in self.nodes:
            if node.op == "get_attr":
                env[node] = graph.node_copy(node, lambda n: env[n])
            elif self.order[node] > limit:
                if node.op == "output":
                    graph.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
                    break
                env[node] = graph.node_copy(node, lambda n: env[n])
        return _module(self.gm, graph)

    def _recompute_derived(self, graph: fx.Graph, env: dict[fx.Node, fx.Node], z: fx.Node, cut: GraphCut) -> None:
        """Sizes from the post-model's own batch size; input-free values copied with their inputs."""
        batch: fx.Node | None = None

        def copy_free(node: fx.Node) -> fx.Node:
            if node not in env:
                env[node] = graph.node_copy(node, copy_free)
            return env[node]

        for name in cut.derived:
            node = self.by_name[name]
            if node not in self.dependent:
                copy_free(node)
                continue
            if batch is None:
                batch = graph.call_method("size", (z, 0))
            form = _batch_scaled(self.values[node], self.values_large[node])
            env[node] = graph.call_function(_resize, (batch, form))


def _module(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()
