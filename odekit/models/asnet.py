"""The ASNet module (thesis ch. 6.3) and its registered builder, so ``load_model`` rebuilds
ASNets without importing ``odekit.methods`` (the construction lives in ``odekit.methods.asnet``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from odekit.models.cut import GraphModel, _chain
from odekit.models.pce import PCELayer
from odekit.models.registry import build_model, register_arch


class ASNet(nn.Sequential):
    """pre-model -> flatten -> AS layer (Linear n_l -> r) -> PCE layer (r -> classes)."""

    pre: nn.Module
    active: nn.Linear
    pce: PCELayer

    def __init__(self, pre: nn.Module, features: int, rank: int, degree: int, num_classes: int) -> None:
        super().__init__(
            OrderedDict(
                pre=pre,
                flatten=nn.Flatten(),
                active=nn.Linear(features, rank),
                pce=PCELayer(rank, degree, num_classes),
            )
        )


@register_arch("asnet", "ASNet (thesis ch. 6.3): teacher pre-model + active-subspace layer + PCE layer", None, "asnet")
def build_asnet(
    teacher_arch: str,
    teacher_args: dict[str, Any],
    cut: int,
    end: int,
    features: int,
    rank: int,
    degree: int,
    num_classes: int,
    node: str | None = None,
    input_shape: list[int] | None = None,
) -> ASNet:
    """Rebuild an ASNet from its JSON args (weights come from the checkpoint). ``node`` and
    ``input_shape`` describe a graph cut (a teacher that is not a plain chain)."""
    if teacher_arch.lower() == "asnet":
        raise ValueError("an ASNet's teacher cannot itself be recorded as an ASNet")
    teacher = build_model(teacher_arch, teacher_args).eval()
    if node is not None:
        if input_shape is None:
            raise ValueError("a graph cut needs the teacher's input_shape")
        graph = GraphModel(teacher, input_shape)
        graph_cut = graph.cut(cut)
        if graph_cut.node != node:
            raise ValueError(f"cut {cut} of the rebuilt teacher ends at '{graph_cut.node}', the checkpoint at '{node}'")
        return ASNet(graph.pre_model(graph_cut), features, rank, degree, num_classes)
    chain = _chain(teacher)
    if not 0 < end <= len(chain):
        raise ValueError(f"cut end {end} is outside the teacher's {len(chain)} modules")
    return ASNet(nn.Sequential(*(m for _, m in chain[:end])), features, rank, degree, num_classes)
