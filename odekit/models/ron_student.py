"""The RON student (thesis eq. 5.14): teacher pre-layers + dense reduced stages + teacher rest.

Registered as architecture ``ron_student``; its JSON args rebuild it, so ``load_model`` reads a
student back without importing ``odekit.methods`` (the construction lives in
``odekit.methods.ron``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from odekit.errors import UnsupportedModelError
from odekit.models.graph import trace_graph
from odekit.models.registry import build_model, register_arch

RON_ARCH = "ron_student"


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

    # train() and eval() are nn.Module's: fine-tuning updates every BatchNorm like in any model
    # (the teacher parts' statistics used to stay frozen, which broke recalibration loops).

    def changed_batchnorms(self) -> list[nn.Module]:
        """The BatchNorm layers after the reduced stages: their inputs are the student's
        approximation, so their teacher statistics are stale (those in ``pre`` see the same
        inputs as in the teacher)."""
        return [m for m in self.rest.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def structural_masks(self, max_density: float = 0.5) -> list[tuple[nn.Parameter, Tensor]]:
        """(weight, mask) of every dense map that is mostly structural zeros: the maps from the
        region input copy rows of the teacher's convolutions (and identity shortcuts), so each
        row has only its receptive field nonzero. Fine-tuning must keep those zeros: Adam moves
        every free entry by about the learning rate per step, and on a 116 x 16384 map with 1%
        nonzeros that noise swamps the weights (docs/finetuning.md)."""
        out: list[tuple[nn.Parameter, Tensor]] = []
        for stage in self.stages:
            for lin in stage.maps:  # type: ignore[union-attr]
                mask = lin.weight.detach() != 0
                if float(mask.float().mean()) <= max_density:
                    out.append((lin.weight, mask))
        return out

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
