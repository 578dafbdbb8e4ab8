"""Channel groups of a traced network: the channels a structure-preserving reduction may drop.

A *producer* (a conv with ``groups=1`` or a linear layer) creates C output channels. They reach
their *consumers* (a conv's input channels, a linear's input columns, possibly after a flatten)
through *channel-wise* ops only: BatchNorm, element-wise activations (ReLU, ReLU6, SiLU, GELU,
hardswish, ...), dropout, depthwise convs, pooling and spatial means, flattens. Keeping P of the
C channels in the producers and channel-wise ops, and folding a C x P reconstruction into every
consumer's input weights, gives the same graph with a smaller width.

Channels tied by residual sums or squeeze-excitation products (``x * gate``) share one
selection: their spaces are merged into one group. A concatenation along the channel dimension
makes one group of its C = C1 + C2 + ... output channels; each input is a *part* (a contiguous
channel range) whose producers and channel-wise ops keep the part of the selection in their
range, provided the input's channels reach nothing but that one concatenation (else the
concatenation and its inputs stay at full width: a DenseNet layer's output joins several).
A group is *blocked* (kept at full width, with the reason) when a channel reaches anything else:
a LayerNorm, a concatenation along another dimension, a reshape with fixed sizes, a parameter
added or multiplied in, the model output.

``channel_groups(gm, input_shape)`` analyses a normalised GraphModule (``trace_graph``).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.models.graph import probe_batch, run_node

# element-wise modules and functions: commute with any channel selection
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.SELU, nn.CELU,
)  # fmt: skip
_ELEMENTWISE_NAMES = {"StochasticDepth", "DropPath"}  # per-sample drops (torchvision, timm)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu,
    F.leaky_relu, F.hardtanh, F.softplus, F.dropout, torch.sigmoid, torch.tanh, torch.clamp,
    F.selu, torch.nn.functional.dropout2d,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "clamp",
    "contiguous",
    "clone",
    "relu_",
    "sigmoid_",
}
_ELEMENTWISE_ATEN = {"relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
                     "leaky_relu", "elu", "hardtanh", "softplus", "mish", "clamp", "dropout", "clone"}  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.max_pool1d,
    F.avg_pool1d,
}
_POOL_ATEN = {  # max pools of an exported graph are lifted to modules (graph_ops)
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
}  # fmt: skip
_SUM_FUNCTIONS = {operator.add, torch.add, operator.iadd}
_PRODUCT_FUNCTIONS = {operator.mul, torch.mul, operator.imul}
_RESHAPES = {"view", "reshape", "flatten"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


@dataclass
class Consumer:
    """A layer reading a group's channels: ``module`` reads node ``read`` (channels at dim 1, or
    the last dim for a linear's (B, T, C) input); ``block`` > 1 when a flatten turned every
    channel into ``block`` consecutive input columns of a linear layer."""

    module: str
    read: str
    block: int = 1
    cdim: int = 1  # the channel dimension of ``read``


@dataclass
class Part:
    """Channels [offset, offset + channels) of a concatenation's group: made by ``producers``
    and passed through ``channelwise`` before the concatenation (they keep only their range)."""

    offset: int
    channels: int
    producers: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)


def split_width(lengths: list[int], width: int) -> list[int]:
    """Channels kept per segment of ``lengths`` at group width ``width``: proportional (largest
    remainder), at least one per segment and at most its length (the sum is ``width`` clamped
    to [len(lengths), sum(lengths)])."""
    total = sum(lengths)
    width = min(max(width, len(lengths)), total)
    ideal = [width * n / total for n in lengths]
    kept = [max(1, min(n, math.floor(q))) for n, q in zip(lengths, ideal, strict=True)]
    while sum(kept) < width:
        i = max((i for i, n in enumerate(lengths) if kept[i] < n), key=lambda i: ideal[i] - kept[i])
        kept[i] += 1
    while sum(kept) > width:
        i = min((i for i in range(len(lengths)) if kept[i] > 1), key=lambda i: ideal[i] - kept[i])
        kept[i] -= 1
    return kept


@dataclass
class ChannelGroup:
    """One set of channels sharing a selection (producers, channel-wise ops, consumers)."""

    index: int
    channels: int
    producers: list[str] = field(default_factory=list)  # weight rows (and bias) sliced
    channelwise: list[str] = field(
        default_factory=list
    )  # BatchNorm, depthwise convs: sliced per channel
    consumers: list[Consumer] = field(default_factory=list)  # input weights folded with T
    reads: list[str] = field(default_factory=list)  # distinct tensors the consumers read
    blocked: str | None = None  # why the group stays at full width
    # a concatenation's inputs: modules listed here (also in producers/channelwise) own a range
    parts: list[Part] = field(default_factory=list)
    origin: str = ""  # the node that made a group without producers (a concatenation)

    @property
    def reducible(self) -> bool:
        return self.blocked is None

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else (self.origin or f"group{self.index}")

    def span(self, module: str) -> tuple[int, int]:
        """(offset, channels) of the range ``module`` makes or passes: its part's, else all C."""
        for part in self.parts:
            if module in part.producers or module in part.channelwise:
                return part.offset, part.channels
        return 0, self.channels

    @property
    def segments(self) -> list[tuple[int, int]]:
        """[start, stop) ranges between every part boundary (one segment without parts)."""
        cuts = {0, self.channels}
        for part in self.parts:
            cuts |= {part.offset, part.offset + part.channels}
        edges = sorted(cuts)
        return list(itertools.pairwise(edges))

    def segment_widths(self, width: int) -> list[int]:
        """Channels a selection of ``width`` keeps in each segment (`split_width`): every part
        keeps at least one channel, so a concatenation's group keeps at least one per segment."""
        return split_width([b - a for a, b in self.segments], width)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "index": self.index, "name": self.name, "channels": self.channels, "producers": self.producers,
            "channelwise": self.channelwise, "consumers": [c.module for c in self.consumers],
            "reducible": self.reducible, "blocked": self.blocked,
        }  # fmt: skip
        if self.parts:
            out["parts"] = [
                {"offset": p.offset, "channels": p.channels, "producers": p.producers} for p in self.parts
            ]
        return out


@dataclass
class _Space:
    channels: int
    parent: int
    producers: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    blocked: str | None = None
    parts: list[tuple[int, int, str]] = field(default_factory=list)  # (space, offset, concat label)
    origin: str = ""


@dataclass
class _Where:
    """A node carrying a space's channels at dim ``cdim`` (of a tensor of rank ``ndim``);
    ``block`` > 1 after a flatten of ``block`` spatial positions per channel."""

    space: int
    cdim: int
    ndim: int
    block: int = 1
    source: str = ""  # the unflattened node a flatten came from


class _Analysis:
    """Union-find over channel spaces while walking the graph in order."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]) -> None:
        self.gm = gm
        self.mods = dict(gm.named_modules())
        self.shapes = shapes
        self.spaces: list[_Space] = []
        self.at: dict[fx.Node, _Where] = {}
        self.calls: dict[str, int] = {}

    # -- union-find
    def root(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def new(self, channels: int, producer: str) -> int:
        self.spaces.append(_Space(channels, len(self.spaces), [producer]))
        return len(self.spaces) - 1

    def block(self, node: Any, reason: str) -> None:
        where = self.at.get(node) if isinstance(node, fx.Node) else None
        if where is not None:
            space = self.spaces[self.root(where.space)]
            space.blocked = space.blocked or reason

    def union(self, a: int, b: int) -> int:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return ra
        sa, sb = self.spaces[ra], self.spaces[rb]
        sb.parent = ra
        sa.producers += sb.producers
        sa.channelwise += sb.channelwise
        sa.consumers += sb.consumers
        sa.parts += sb.parts
        sa.blocked = sa.blocked or sb.blocked
        if sa.channels != sb.channels:
            sa.blocked = sa.blocked or "tied channel counts differ"
        return ra

    def space(self, node: fx.Node) -> _Space:
        return self.spaces[self.root(self.at[node].space)]


def _label(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(mods[str(node.target)]).__name__} '{node.target}'"
    if node.op == "output":
        return "the model output"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name} ('{node.name}')"


def _aten_name(node: fx.Node) -> str | None:
    """The op's name (``relu``, ``cat``...) when ``node`` calls an aten overload (an exported
    graph), else None."""
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target.overloadpacket.__name__)
    return None


def _is_elementwise(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = mods[str(node.target)]
        return isinstance(m, _ELEMENTWISE_MODULES) or type(m).__name__ in _ELEMENTWISE_NAMES
    if node.op == "call_method":
        return str(node.target) in _ELEMENTWISE_METHODS
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return True
        if (aten := _aten_name(node)) is not None:
            return aten.rstrip("_") in _ELEMENTWISE_ATEN
    return False


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _scalar_args(node: fx.Node, first: fx.Node) -> bool:
    """Every argument besides ``first`` is a Python number (or None)."""
    rest = [a for a in (*node.args, *node.kwargs.values()) if a is not first]
    return all(isinstance(a, int | float | bool) or a is None for a in rest)


def _record_shapes(
    gm: fx.GraphModule, input_shape: tuple[int, ...]
) -> dict[fx.Node, tuple[int, ...]]:
    """Shapes (batch of 2) of every tensor-valued node."""
    mods = dict(gm.named_modules())
    env: dict[fx.Node, Any] = {}
    shapes: dict[fx.Node, tuple[int, ...]] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = probe_batch(gm, input_shape, 2)
            elif node.op == "output":
                break
            else:
                env[node] = run_node(node, env, gm, mods)
            if isinstance(env[node], Tensor):
                shapes[node] = tuple(env[node].shape)
    return shapes


def channel_groups(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> list[ChannelGroup]:
    """The channel groups of ``gm`` (reducible and blocked), ordered from the input side."""
    was_training = gm.training
    gm.eval()
    try:
        shapes = _record_shapes(gm, tuple(input_shape))
    finally:
        gm.train(was_training)
    an = _Analysis(gm, shapes)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            an.calls[str(node.target)] = an.calls.get(str(node.target), 0) + 1
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        _visit(an, node)
    return _collect(an)


def _visit(an: _Analysis, node: fx.Node) -> None:
    """Propagate channel spaces through one node (or block the spaces it reads)."""
    mods = an.mods
    inputs = [i for i in _tensor_inputs(node) if i in an.at]
    module = mods.get(str(node.target)) if node.op == "call_module" else None
    if (
        module is not None
        and an.calls[str(node.target)] > 1
        and any(True for _ in module.parameters())
    ):
        for i in inputs:
            an.block(i, f"{_label(node, mods)} runs more than once")
        return
    if isinstance(module, (*_CONV, nn.Linear)):
        _visit_compute(an, node, module, inputs)
        return
    if not inputs:
        return
    if _is_cat(node) and _visit_cat(an, node, inputs):
        return
    first = inputs[0]
    where = an.at[first]
    if len(inputs) == 1 and node.args and node.args[0] is first:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if where.cdim == 1 and where.block == 1:
                an.space(first).channelwise.append(str(node.target))
                an.at[node] = where
                return
        elif _is_elementwise(node, mods) and _scalar_args(node, first):
            an.at[node] = where
            return
        elif _is_pool(node, module) and where.cdim == 1 and where.block == 1:
            an.at[node] = _Where(where.space, 1, len(an.shapes[node]))
            return
        elif _reshape(an, node, first, where):
            return
    if _visit_pair(an, node, inputs):
        return
    sums = _SUM_FUNCTIONS | _PRODUCT_FUNCTIONS | {"add", "mul"}
    joined = (node.target if node.op == "call_function" else str(node.target)) in sums
    reason = "it meets a tensor of fixed channels at" if joined and len(_tensor_inputs(node)) > 1 else "it reaches"
    for i in inputs:
        an.block(i, f"{reason} {_label(node, mods)}")


def _is_pool(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, _POOL_MODULES)
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        return True
    if (aten := _aten_name(node)) is not None:  # an exported (.pt2) graph's pools
        return aten in _POOL_ATEN
    if node.op == "call_method" and str(node.target) in ("mean", "amax", "sum"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, list | tuple) else [dims]
        return all(isinstance(d, int) and d >= 2 for d in dims)
    return False


def _reshape(an: _Analysis, node: fx.Node, first: fx.Node, where: _Where) -> bool:
    """A flatten of (B, C, *S) into (B, C * prod(S)), or a reshape that changes nothing."""
    is_reshape = (
        (node.op == "call_method" and str(node.target) in _RESHAPES)
        or (node.op == "call_function" and node.target in (torch.flatten, torch.reshape))
        or (node.op == "call_module" and isinstance(an.mods[str(node.target)], nn.Flatten))
        or _aten_flatten(node)
    )
    if not is_reshape or node not in an.shapes:
        return False
    if any(isinstance(a, int) and a not in (-1, 0, 1) for a in node.args[1:]) and not (
        node.op == "call_method" and str(node.target) == "flatten"
    ):
        return False  # fixed sizes written into the graph would break at a smaller width
    before, after = an.shapes[first], an.shapes[node]
    if before == after:
        an.at[node] = where
        return True
    if (
        where.cdim == 1
        and where.block == 1
        and len(after) == 2
        and after[1] == math.prod(before[1:])
    ):
        an.at[node] = _Where(where.space, 1, 2, math.prod(before[2:]), first.name)
        return True
    return False


def _aten_flatten(node: fx.Node) -> bool:
    """``aten.flatten.using_ints`` of an exported (.pt2) graph."""
    return node.op == "call_function" and _aten_name(node) == "flatten"


def _visit_pair(an: _Analysis, node: fx.Node, inputs: list[fx.Node]) -> bool:
    """Residual sums and gating products: every tensor operand carries channels, one selection."""
    summed = (node.op == "call_function" and node.target in _SUM_FUNCTIONS) or (
        node.op == "call_method" and str(node.target) == "add"
    )
    product = (node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS) or (
        node.op == "call_method" and str(node.target) == "mul"
    )
    if (name := _aten_name(node)) is not None:
        summed, product = name in ("add", "add_"), name in ("mul", "mul_")
    if not (summed or product):
        return False
    operands = [a for a in node.args[:2]]
    tensors = [a for a in operands if isinstance(a, fx.Node)]
    if any(t not in an.at for t in tensors) or any(
        not isinstance(a, fx.Node | int | float) for a in operands
    ):
        return False
    wheres = [an.at[t] for t in tensors]
    if len({(w.cdim, w.block) for w in wheres}) != 1 or wheres[0].block != 1:
        return False
    if len(tensors) == 2 and product and wheres[0].cdim != 1:
        return False
    root = wheres[0].space
    for w in wheres[1:]:
        root = an.union(root, w.space)
    an.at[node] = _Where(root, wheres[0].cdim, len(an.shapes.get(node, ())) or wheres[0].ndim)
    return True


def _visit_compute(an: _Analysis, node: fx.Node, module: nn.Module, inputs: list[fx.Node]) -> None:
    """Conv/linear: a consumer of its input's channels and a producer of new ones (a depthwise
    conv passes its input's channels through instead)."""
    name = str(node.target)
    out_shape = an.shapes.get(node, ())
    src = inputs[0] if inputs else None
    where = an.at.get(src) if src is not None else None
    if isinstance(module, _CONV):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if depthwise:
            if where is not None and where.cdim == 1 and where.block == 1:
                an.space(src).channelwise.append(name)  # type: ignore[arg-type]
                an.at[node] = _Where(where.space, 1, len(out_shape))
            return
        if module.groups > 1:
            an.block(src, f"grouped conv '{name}' reads it")
            space = an.new(module.out_channels, name)
            an.spaces[space].blocked = f"grouped conv '{name}' makes it"
            an.at[node] = _Where(space, 1, len(out_shape))
            return
        if where is not None:
            if where.cdim == 1 and where.block == 1:
                an.space(src).consumers.append(Consumer(name, src.name))  # type: ignore[union-attr,arg-type]
            else:
                an.block(src, f"conv '{name}' reads it in another layout")
        an.at[node] = _Where(an.new(module.out_channels, name), 1, len(out_shape))
        return
    assert isinstance(module, nn.Linear)
    if where is not None:
        if where.cdim == where.ndim - 1:
            read, cdim = (where.source, 1) if where.source else (src.name, where.cdim)  # type: ignore[union-attr]
            an.space(src).consumers.append(Consumer(name, read, where.block, cdim))  # type: ignore[arg-type]
        else:
            an.block(src, f"linear '{name}' reads it in another layout")
    an.at[node] = _Where(an.new(module.out_features, name), len(out_shape) - 1, len(out_shape))


def _is_cat(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if (aten := _aten_name(node)) is not None:
        return aten in ("cat", "concat")
    return node.target in _CAT_FUNCTIONS


def _visit_cat(an: _Analysis, node: fx.Node, inputs: list[fx.Node]) -> bool:
    """A concatenation along the channel dimension: a new space of C1 + C2 + ... channels whose
    parts are the inputs' spaces (resolved in `_link_parts`). False for another dimension."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, list | tuple) or not isinstance(dim, int) or node not in an.shapes:
        return False
    ndim = len(an.shapes[node])
    dim %= ndim
    label = _label(node, an.mods)
    if not all(isinstance(t, fx.Node) and t in an.at for t in tensors):
        for t in inputs:
            an.block(t, f"it is concatenated with channels of fixed width at {label}")
        return True
    wheres = [an.at[t] for t in tensors]
    if any(w.cdim != dim or w.block != 1 or w.ndim != ndim for w in wheres):
        return False
    space = len(an.spaces)
    an.spaces.append(_Space(an.shapes[node][dim], space, origin=node.name))
    offset = 0
    for t, w in zip(tensors, wheres, strict=True):
        an.spaces[space].parts.append((w.space, offset, label))
        offset += an.shapes[t][dim]
    an.at[node] = _Where(space, dim, ndim)
    return True


def _space_name(sp: _Space) -> str:
    return sp.producers[0] if sp.producers else sp.origin


def _link_parts(an: _Analysis, roots: list[int]) -> list[tuple[int, int, int, str]]:
    """Every (concatenation, input, offset, label) between root spaces. An input that anything
    else reads (a layer, another concatenation: DenseNet) blocks both; blocking then spreads
    along the links (a part at full width fixes its concatenation's channels and vice versa)."""
    links = [(r, an.root(q), off, label) for r in roots for q, off, label in an.spaces[r].parts]
    uses = Counter(q for _, q, _, _ in links)
    for r, q, _, label in links:
        sr, sq = an.spaces[r], an.spaces[q]
        if q == r:
            sr.blocked = sr.blocked or f"{label} joins channels tied to its own output"
        elif uses[q] > 1:
            sq.blocked = sq.blocked or f"it reaches {label} and other concatenations"
            sr.blocked = sr.blocked or (
                f"{label} joins '{_space_name(sq)}', which other concatenations join too "
                "(each would need its own selection)"
            )
        elif sq.consumers:
            reader = sq.consumers[0].module
            sq.blocked = sq.blocked or f"it reaches {label} and '{reader}' reads it too"
            sr.blocked = sr.blocked or f"{label} joins '{_space_name(sq)}', which '{reader}' reads too"
    changed = True
    while changed:
        changed = False
        for r, q, _, label in links:
            sr, sq = an.spaces[r], an.spaces[q]
            if sq.blocked and not sr.blocked:
                sr.blocked = f"its part '{_space_name(sq)}' ({label}) stays at full width: {sq.blocked}"
                changed = True
            if sr.blocked and not sq.blocked:
                sq.blocked = f"it reaches {label}, which stays at full width"
                changed = True
    return links


def _parts(an: _Analysis, links: list[tuple[int, int, int, str]], r: int, base: int) -> list[Part]:
    """The parts of concatenation space ``r`` (nested concatenations flattened), offsets from ``base``."""
    out: list[Part] = []
    for rr, q, off, _ in links:
        if rr != r:
            continue
        sq = an.spaces[q]
        if sq.producers or sq.channelwise:
            out.append(Part(base + off, sq.channels, list(dict.fromkeys(sq.producers)),
                            list(dict.fromkeys(sq.channelwise))))  # fmt: skip
        out += _parts(an, links, q, base + off)
    return out


def _collect(an: _Analysis) -> list[ChannelGroup]:
    order = {n.name: i for i, n in enumerate(an.gm.graph.nodes)}
    module_order: dict[str, int] = {}
    for n in an.gm.graph.nodes:
        if n.op == "call_module":
            module_order.setdefault(str(n.target), order[n.name])
    roots = [i for i in range(len(an.spaces)) if an.root(i) == i]
    links = _link_parts(an, roots)
    absorbed = {q for _, q, _, _ in links if an.spaces[q].blocked is None}
    keyed: list[tuple[int, ChannelGroup]] = []
    for i in roots:
        if i in absorbed:
            continue
        sp = an.spaces[i]
        parts = _parts(an, links, i, 0) if sp.blocked is None else []
        reads = sorted({c.read for c in sp.consumers}, key=order.__getitem__)
        blocked = sp.blocked
        if blocked is None and not sp.consumers:
            blocked = "no layer reads it"
        producers = list(dict.fromkeys([*sp.producers, *(p for part in parts for p in part.producers)]))
        channelwise = list(dict.fromkeys([*sp.channelwise, *(m for part in parts for m in part.channelwise)]))
        group = ChannelGroup(0, sp.channels, producers, channelwise, sp.consumers, reads, blocked,
                             parts, sp.origin)  # fmt: skip
        key = min((module_order[p] for p in producers), default=order.get(sp.origin, len(order)))
        keyed.append((key, group))
    keyed.sort(key=lambda kg: kg[0])
    groups = [g for _, g in keyed]
    for i, g in enumerate(groups):
        g.index = i
    return groups
