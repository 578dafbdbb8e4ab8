"""Graph-level steps of channel reduction: run a graph up to some nodes, stream channel Gram
matrices, keep channels in producers and channel-wise layers, fold a reconstruction into consumers."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.distributed import Distributed, shard_indices
from odekit.models.channel_groups import ChannelGroup
from odekit.models.graph import run_node


def channel_rows(t: Tensor, cdim: int) -> Tensor:
    """(rows, C): every channel vector of ``t`` (every sample, pixel and token)."""
    return t.movedim(cdim, -1).reshape(-1, t.shape[cdim])


@dataclass
class Cut:
    """The live values of one batch just before node ``at`` (every value computed earlier that a
    node at or after ``at`` reads): a run can resume there instead of starting from the input."""

    at: int
    env: dict[fx.Node, object]
    x: Tensor


_INPLACE_FUNCTIONS = {operator.iadd, operator.imul, operator.isub, operator.itruediv}


def _mutates_first_argument(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or getattr(node.target, "__name__", "").endswith(
            "_"
        )
    return False


class PrefixRunner:
    """Runs a GraphModule node by node until the wanted nodes are computed, freeing every value
    no later node reads (the peak holds the live activations of one batch, not all of them).
    A run can stop at a `Cut` and a later run resume from it (the layers before the cut unchanged)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.mods = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {
            n: max((self.order[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)
        }
        # values a later in-place op changes: copied when kept past the op (a cut, a wanted value)
        self.mutated = {
            n.args[0]
            for n in self.nodes
            if _mutates_first_argument(n) and isinstance(n.args[0], fx.Node)
        }
        for m in gm.modules():  # in-place activations would change kept values under us
            if getattr(m, "inplace", False):
                m.inplace = False  # type: ignore[assignment]

    def start_of(self, modules: Iterable[str]) -> int:
        """The first node that runs (or reads a parameter of) any of ``modules``: changing those
        modules leaves every value before it as it was. 0 when one of them is never called."""
        names = set(modules)
        first: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            target = str(node.target)
            if node.op == "call_module" and target in names:
                first.setdefault(target, i)
            elif node.op == "get_attr":
                for name in names:
                    if target.startswith(name + "."):
                        first.setdefault(name, i)
        return min(first.values()) if len(first) == len(names) else 0

    @torch.no_grad()
    def cut_bytes(self, x: Tensor, positions: Iterable[int]) -> int:
        """The largest memory of the live values at any of ``positions`` for the batch ``x``."""
        at = set(positions)
        largest = 0
        cut = Cut(0, {}, x)
        for i in sorted(at):
            kept = self.resume(cut, [], i)[1]
            assert kept is not None
            largest = max(largest, sum(v.numel() * v.element_size() for v in kept.env.values()
                                       if isinstance(v, Tensor)))  # fmt: skip
            cut = kept
        return largest

    @torch.no_grad()
    def values(self, x: Tensor, wanted: list[str]) -> dict[str, Tensor]:
        return self.resume(Cut(0, {}, x), wanted)[0]

    @torch.no_grad()
    def resume(
        self,
        cut: Cut,
        wanted: list[str],
        stop_at: int | None = None,
        visit: Callable[[str, Tensor], None] | None = None,
    ) -> tuple[dict[str, Tensor], Cut | None]:
        """The ``wanted`` nodes' values, running from ``cut``; with ``stop_at`` (>= cut.at) also
        the cut before node ``stop_at``. With ``visit``, each wanted value is handed to it when
        computed instead of being kept (the peak then holds one of them, not all)."""
        todo = set(wanted)
        found: dict[str, Tensor] = {}
        env = dict(cut.env)
        kept: Cut | None = None
        for i in range(cut.at, len(self.nodes)):
            if i == stop_at:
                kept = Cut(i, {n: self._keep(n, v) for n, v in env.items()}, cut.x)
            if not todo and (stop_at is None or kept is not None):
                break
            node = self.nodes[i]
            if node.op == "output":
                break
            env[node] = (
                cut.x if node.op == "placeholder" else run_node(node, env, self.gm, self.mods)
            )
            if node.name in todo:
                todo.discard(node.name)
                if visit is not None:
                    visit(node.name, env[node])  # type: ignore[arg-type]
                else:
                    found[node.name] = self._keep(node, env[node])  # type: ignore[assignment]
            for inp in node.all_input_nodes:
                if self.last_use[inp] <= i and inp.name not in todo:
                    env.pop(inp, None)
        return found, kept

    @torch.no_grad()
    def finish(self, cut: Cut) -> Any:
        """The graph's output, running from ``cut``."""
        env: dict[fx.Node, Any] = dict(cut.env)
        for i in range(cut.at, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda n: env[n])
            env[node] = (
                cut.x if node.op == "placeholder" else run_node(node, env, self.gm, self.mods)
            )
            for inp in node.all_input_nodes:
                if self.last_use[inp] <= i:
                    env.pop(inp, None)
        raise RuntimeError("the graph has no output node")

    def _keep(self, node: fx.Node, value: object) -> object:
        return value.clone() if node in self.mutated and isinstance(value, Tensor) else value


@dataclass
class ReadGrams:
    """Streamed second moments of one read tensor's channel vectors (float64, C x C):
    ``ss`` = Zs^T Zs (student), ``st`` = Zs^T Zt (student x teacher), ``tt`` = Zt^T Zt."""

    ss: Tensor
    st: Tensor
    tt: Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, c: int, device: torch.device) -> ReadGrams:
        z = torch.zeros(c, c, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def update(self, student: Tensor, teacher: Tensor) -> None:
        add_gram(self.ss, student, student)
        add_gram(self.st, student, teacher)
        add_gram(self.tt, teacher, teacher)
        self.rows += int(student.shape[0])


GRAM_CHUNK_ROWS = 1 << 15  # float64 copies of at most this many channel vectors at a time


def add_gram(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a^T b`` in float64, a block of rows at a time (a 224 x 224 batch's rows in float64
    would be gigabytes)."""
    for start in range(0, a.shape[0], GRAM_CHUNK_ROWS):
        stop = start + GRAM_CHUNK_ROWS
        ab = a[start:stop].double()
        acc += ab.T @ (ab if b is a else b[start:stop].double())


def sum_grams(grams: dict[str, ReadGrams], dist: Distributed | None) -> None:
    """Sum every read's moments and row count over the ranks, in place (one all-reduce): every
    rank then holds the moments of all the ranks' images."""
    if dist is None or dist.world_size == 1:
        return
    reads = list(grams.values())
    moments = [t for g in reads for t in (g.ss, g.st, g.tt)]
    rows = torch.tensor([float(g.rows) for g in reads], dtype=torch.float64, device=moments[0].device)
    *summed, summed_rows = dist.all_reduce_sum_many([*moments, rows])
    for i, g in enumerate(reads):
        g.ss, g.st, g.tt = summed[3 * i : 3 * i + 3]
    for g, n in zip(reads, summed_rows.tolist(), strict=True):
        g.rows = round(n)


def rank_block(x: Tensor, dist: Distributed | None) -> Tensor:
    """This rank's contiguous block of ``x`` along the first dimension (`shard_indices`; all of
    ``x`` without ``dist``)."""
    if dist is None or dist.world_size == 1:
        return x
    part = shard_indices(int(x.shape[0]), dist.rank, dist.world_size)
    return x[part.start : part.stop]


def batches(x: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size].to(device)


def _set(module: nn.Module, name: str, value: Tensor | None) -> None:
    if value is None:
        return
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, value.detach().clone())


def keep_outputs(module: nn.Module, keep: Tensor) -> None:
    """Keep output channels ``keep`` of a producer or channel-wise layer (conv, linear, BatchNorm,
    depthwise conv)."""
    p = int(keep.numel())
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name, None)
            _set(module, name, t[keep.to(t.device)] if t is not None else None)
        module.num_features = p
        return
    weight: Tensor = module.weight  # type: ignore[assignment]
    keep = keep.to(weight.device)
    _set(module, "weight", weight[keep])
    bias = getattr(module, "bias", None)
    _set(module, "bias", bias[keep] if bias is not None else None)
    if isinstance(module, nn.Linear):
        module.out_features = p
        return
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    if module.groups > 1:  # depthwise: one filter per channel
        module.in_channels = module.groups = p
    module.out_channels = p


def fold_inputs(module: nn.Module, t: Tensor, block: int) -> None:
    """Replace a consumer's C input channels by P: W' = W T (T: C x P), per flattened ``block``."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    w = weight.detach()
    t = t.to(device=w.device, dtype=torch.float64)
    c, p = t.shape
    if isinstance(module, nn.Linear):
        out = w.shape[0]
        folded = torch.einsum("ocb,cp->opb", w.double().reshape(out, c, block), t).reshape(
            out, p * block
        )
        module.in_features = p * block
    else:
        assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups == 1
        folded = torch.einsum("oc...,cp->op...", w.double(), t)
        module.in_channels = p
    _set(module, "weight", folded.to(w.dtype))


def apply_selection(
    gm: fx.GraphModule, group: ChannelGroup, keep: Tensor, maps: dict[str, Tensor]
) -> None:
    """Shrink ``group`` to the channels ``keep`` in ``gm``; ``maps[read]`` (C x P) is folded into
    every consumer reading ``read``. A concatenation's part keeps the channels of ``keep`` in
    its range (shifted to it), and must keep at least one."""
    mods = dict(gm.named_modules())
    keep = keep.to(torch.long)
    for name in (*group.producers, *group.channelwise):
        lo, n = group.span(name)
        own = keep[(keep >= lo) & (keep < lo + n)] - lo
        if own.numel() == 0:
            raise ValueError(
                f"the channel selection drops every channel of '{name}' (channels {lo}-{lo + n - 1} of group "
                f"'{group.name}'): keep at least one channel of every concatenated part"
            )
        keep_outputs(mods[name], own)
    for consumer in group.consumers:
        fold_inputs(mods[consumer.module], maps[consumer.read], consumer.block)


def pick_by_segment(basis: Tensor, segments: list[tuple[int, int]], quotas: list[int]) -> Tensor:
    """``sum(quotas)`` rows of ``basis`` (C x P), ``quotas[i]`` of them in ``segments[i]``:
    greedy pivoted Gram-Schmidt (each step takes the row with the largest residual norm among
    the segments with quota left and projects it out, the DEIM pick). Sorted indices."""
    r = basis.detach().clone().double()
    seg = torch.empty(r.shape[0], dtype=torch.long)
    for i, (a, b) in enumerate(segments):
        seg[a:b] = i
    left = torch.tensor(quotas, dtype=torch.long)
    taken = torch.zeros(r.shape[0], dtype=torch.bool)
    for _ in range(sum(quotas)):
        norms = r.pow(2).sum(1).cpu()
        norms[taken | (left[seg] <= 0)] = -1.0
        i = int(norms.argmax())
        taken[i] = True
        left[seg[i]] -= 1
        q = r[i] / r[i].norm().clamp_min(1e-300)
        r -= torch.outer(r @ q, q)
    return torch.nonzero(taken).flatten()


def top_by_segment(scores: Tensor, segments: list[tuple[int, int]], quotas: list[int]) -> Tensor:
    """The ``quotas[i]`` largest ``scores`` in each segment. Sorted indices."""
    picks = [a + torch.topk(scores[a:b], k).indices for (a, b), k in zip(segments, quotas, strict=True)]
    return torch.cat(picks).sort().values.cpu()


def read_dims(group: ChannelGroup) -> dict[str, int]:
    """The channel dimension of every tensor the group's consumers read."""
    return {c.read: c.cdim for c in group.consumers}
