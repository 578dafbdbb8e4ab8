"""`certify` end to end for one model, and a student set beside its teacher."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.io.datasets import Dataset
from odekit.methods.attacks.space import pixel_model, to_pixels
from odekit.methods.certify.certificate import (
    Certificate,
    CertifySettings,
    Radii,
    budget_rows,
    certified_radii,
    empirical_radii,
    local_lower,
    margins,
)
from odekit.methods.certify.network import BoundSettings, LayerBound, NetworkBound, network_bound
from odekit.methods.certify.ops import NotCertifiable
from odekit.models.graph import trace_graph
from odekit.models.layers import layer_table, resolve_layers
from odekit.progress import Progress


@dataclass
class ModelCertificate:
    """The layer bounds, the network bound and the certificate of one model."""

    network: NetworkBound
    certificate: Certificate
    selected: list[LayerBound] | None
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        out = {**self.certificate.to_dict(), **self.network.to_dict(), "seconds": self.seconds}
        out["lipschitz_upper"] = self.network.upper
        if self.selected is not None:
            out["selected_layers"] = [layer.to_dict() for layer in self.selected]
            out["selected_product_upper"] = math.prod(layer.bound.upper for layer in self.selected)
        return out


def logits_module(gm: fx.GraphModule, node_name: str) -> nn.Module:
    """``gm`` returning the named node (the logits before a final softmax), or ``gm`` itself."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if isinstance(out.args[0], fx.Node) and out.args[0].name == node_name:
        return gm
    cut = copy.deepcopy(gm)
    target = next(n for n in cut.graph.nodes if n.name == node_name)
    out_node = next(n for n in cut.graph.nodes if n.op == "output")
    out_node.args = (target,)
    cut.graph.eliminate_dead_code()
    cut.recompile()
    return cut


def _selected(network: NetworkBound, gm: fx.GraphModule, input_shape: tuple[int, ...], spec: str | None) -> list[LayerBound] | None:
    if spec is None:
        return None
    names = {info.name for info in resolve_layers(spec, layer_table(gm, input_shape))}
    return [layer for layer in network.layers if layer.name in names]


def refuse_ode(model: nn.Module) -> None:
    """ODE nets: the adaptive/fixed-step solver loop is not a traced graph, so no bound."""
    from odekit.ode.block import ODEBlock

    if any(isinstance(m, ODEBlock) for m in model.modules()):
        raise NotCertifiable(
            "certify bounds traced feed-forward graphs; this is an ODE net, whose solver loop does not trace into one",
            "certify a discrete network (a reduce/asnet student of it, or a ResNet-style model)",
        )


def certify_model(model: nn.Module, data: Dataset, x: Tensor, y: Tensor, settings: CertifySettings, *,
                  seed: int = 0, progress: Progress | None = None) -> ModelCertificate:  # fmt: skip
    """Bound every layer of ``model`` and certify it on ``x`` (model-input units), labels ``y``."""
    clock = time.perf_counter()
    shape = tuple(data.input_shape)
    refuse_ode(model)
    gm = trace_graph(model, shape, what="certify")
    gm.eval()
    indices = {info.name: info.index for info in layer_table(gm, shape).layers}
    bounds = BoundSettings(settings.iters, settings.power_iters)
    network = network_bound(gm, x[:1], bounds, indices)
    selected = _selected(network, gm, shape, settings.layers)
    seconds = {"bounds": time.perf_counter() - clock}
    clock = time.perf_counter()
    logits = logits_module(gm, network.output)
    pred, gap, values = margins(logits, x, settings.batch_size)
    correct = pred == y.cpu()
    inv_std = float((1.0 / data.pixel_scale.double()).max())
    l_pixel = network.upper * inv_std
    radius = certified_radii(values, pred, l_pixel, network.head_weight, network.head_input_bound * inv_std)
    certified = torch.where(correct, radius, torch.zeros_like(radius))
    lower = local_lower(logits, x, settings.batch_size)
    empirical = broken = None
    if settings.attack:
        x_pix = to_pixels(x, data, "the test data")
        empirical, broken = empirical_radii(pixel_model(logits, data), x_pix, y, settings, seed, progress)
    seconds["certificate"] = time.perf_counter() - clock
    radii = Radii(correct, gap, certified, empirical, lower)
    cert = Certificate(network.upper, l_pixel, radii, budget_rows(radii, settings.budgets, broken))
    return ModelCertificate(network, cert, selected, seconds)


def comparison(student: ModelCertificate, teacher: ModelCertificate) -> dict[str, Any]:
    """Student beside teacher: bound, clean, certified and robust accuracy, and their changes."""
    s, t = student.certificate, teacher.certificate
    rows: list[dict[str, Any]] = [
        _pair("lipschitz_upper", s.lipschitz_upper, t.lipschitz_upper, ratio=True),
        _pair("clean_accuracy", s.clean.rate, t.clean.rate),
        _pair("median_certified_radius", _median(s.radii.certified, s.radii.correct),
              _median(t.radii.certified, t.radii.correct), ratio=True),
    ]
    for srow, trow in zip(s.rows, t.rows, strict=True):
        rows.append(_pair(f"certified_accuracy@{srow.eps:g}", srow.certified.rate, trow.certified.rate))
        if srow.robust is not None and trow.robust is not None:
            rows.append(_pair(f"robust_accuracy@{srow.eps:g}", srow.robust.rate, trow.robust.rate))
    return {"rows": rows, "samples": len(s.radii.correct)}


def _median(t: Tensor, keep: Tensor) -> float:
    return float(t[keep].median()) if bool(keep.any()) else float("nan")


def _pair(metric: str, student: float, teacher: float, ratio: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"metric": metric, "student": student, "teacher": teacher, "change": student - teacher}
    if ratio:
        row["ratio"] = student / teacher if teacher else float("nan")
    return row
