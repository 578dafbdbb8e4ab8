"""Cutting a teacher after a compute layer into pre- and post-model: plain chains of modules
(``ChainModel``) and any traceable graph (``GraphModel``). ASNet analysis and rebuilding use these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from odekit.errors import LayerSelectionError, UnsupportedModelError
from odekit.models.graph import TORCHSCRIPT_HINT, probe_batch, runnable
from odekit.models.layers import COMPUTE_TYPES, LayerInfo, ModelSummary, layer_table, resolve_layers
from odekit.models.split import GraphCut, GraphSplitter

# ----------------------------------------------------------------------------- model slicing


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaves in registration order, opening the root and every nn.Sequential (other modules
    with children, e.g. residual blocks, stay whole)."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, is_root: bool) -> None:
        children = list(module.named_children())
        if children and (is_root or isinstance(module, nn.Sequential)):
            for name, child in children:
                walk(f"{prefix}.{name}" if prefix else name, child, False)
        else:
            out.append((prefix, module))

    walk("", model, True)
    return out


def _has_compute(module: nn.Module) -> bool:
    return any(isinstance(m, COMPUTE_TYPES) for m in module.modules())


def _cut_layer(spec: str | int, summary: ModelSummary) -> LayerInfo:
    """The one compute layer a --cut names; the last layer leaves nothing to replace."""
    chosen = resolve_layers(str(spec), summary)
    if len(chosen) != 1:
        raise LayerSelectionError(f"`cut` must name one layer, '{spec}' gives {len(chosen)}", "e.g. `cut` 5")
    layer = chosen[0]
    if layer.index == len(summary.layers):
        raise LayerSelectionError(
            f"layer {layer.index} is the last compute layer: nothing would be left to replace",
            f"cut at a layer before {layer.index}",
        )
    return layer


@dataclass(frozen=True)
class Cut:
    """Where the teacher is split: compute layer ``index`` (1-based) ends the pre-model at
    chain position ``end`` (exclusive); ``features`` = n_l, the flattened pre-model output size."""

    index: int
    name: str
    alias: str
    end: int
    features: int
    out_shape: list[int]
    node: str | None = None  # a graph cut: the traced graph's node that ends the pre-model
    frontier: list[str] | None = None  # a graph cut: the tensors the post-model reads

    def to_dict(self) -> dict[str, Any]:
        out = {"index": self.index, "name": self.name, "alias": self.alias, "n_l": self.features,
               "out_shape": self.out_shape}  # fmt: skip
        if self.node is not None:
            out.update(node=self.node, frontier=self.frontier)
        return out


class ChainModel:
    """A teacher that is a plain chain of modules, verified against its own forward pass."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                "ASNet needs the model's modules, not a TorchScript archive", TORCHSCRIPT_HINT
            )
        self.model = model
        self.input_shape = tuple(input_shape)
        self.chain = _chain(model)
        was_training = model.training
        model.eval()  # layer_table's FLOP count runs a forward pass: keep BatchNorm statistics frozen
        try:
            self.summary = layer_table(model, self.input_shape)
        finally:
            model.train(was_training)
        self._verify()
        # chain position of every compute layer that is itself a chain element
        names = {name: pos for pos, (name, _) in enumerate(self.chain)}
        self.position = {layer.index: names[layer.name] for layer in self.summary.layers if layer.name in names}

    def _verify(self) -> None:
        was_training = self.model.training
        self.model.eval()
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        x = torch.randn(2, *self.input_shape, generator=torch.Generator().manual_seed(0)).to(device)
        try:
            with torch.no_grad():
                want = self.model(x)
                got = x
                for _, module in self.chain:
                    got = module(got)
            same = got.shape == want.shape and bool(
                torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1.0 + float(want.abs().max())))
            )
        except Exception:  # e.g. an AssertionError in a child's forward: not a chain
            same = False
        finally:
            self.model.train(was_training)
        if not same:
            raise UnsupportedModelError(
                f"the model ({type(self.model).__name__}) is not a plain chain of modules, so it cannot be "
                "cut into pre-model and post-model (residual connections or a custom forward)",
                "ASNet supports Sequential-style models such as lenet300, lenet5, mlp and vgg*",
            )

    def cut(self, spec: str | int) -> Cut:
        """Resolve a cut layer (index, alias or module name) to a `Cut`."""
        layer = _cut_layer(spec, self.summary)
        if layer.index not in self.position:
            raise UnsupportedModelError(
                f"layer {layer.index} ('{layer.name}') sits inside a composite module that ASNet cannot split",
                "cut at a layer that is a direct element of the model's Sequential containers",
            )
        end = self.position[layer.index] + 1
        # Keep the parameter-free / normalisation modules after the layer (BN, activation,
        # pooling, flatten): the thesis counts VGG-19 layer 4 as 8192 = 128 x 8 x 8 neurons.
        while end < len(self.chain) and not _has_compute(self.chain[end][1]):
            end += 1
        if end >= len(self.chain):
            raise LayerSelectionError(f"nothing follows layer {layer.index}", "cut at an earlier layer")
        shape = self.pre_output_shape(end)
        return Cut(layer.index, layer.name, layer.alias, end, int(math.prod(shape)), shape)

    def pre_output_shape(self, end: int) -> list[int]:
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        x = torch.zeros(1, *self.input_shape, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for _, module in self.chain[:end]:
                    x = module(x)
        finally:
            self.model.train(was_training)
        return list(x.shape[1:])

    def pre_model(self, cut: Cut) -> nn.Sequential:
        """Layers 1..l (shared with the teacher, not copied)."""
        return nn.Sequential(*(module for _, module in self.chain[: cut.end]))

    def post_model(self, cut: Cut) -> nn.Sequential:
        return nn.Sequential(*(module for _, module in self.chain[cut.end :]))

    def last_pre_module(self, cut: Cut) -> nn.Module:
        return self.chain[cut.end - 1][1]

    def analysable_layers(self) -> list[int]:
        """Compute layers that can be cut at (direct chain elements, not the last layer)."""
        last = len(self.summary.layers)
        return [i for i in sorted(self.position) if i < last]

    def gradient_model(self, cut: Cut) -> tuple[nn.Module, nn.Module]:
        """(model, module whose output is the cut activation) for per-sample gradients."""
        return self.model, self.last_pre_module(cut)


class GraphModel:
    """A teacher of any traceable architecture (residual blocks, custom forward, ``.pt2``
    graphs), cut by splitting its graph after a compute layer (``odekit.models.split``)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> None:
        self.input_shape = tuple(input_shape)
        self.splitter = GraphSplitter(model, self.input_shape, what="ASNet")
        self.model = self.splitter.gm
        self.summary = self.splitter.summary
        self._cuts: dict[str, GraphCut] = {}

    def cut(self, spec: str | int) -> Cut:
        layer = _cut_layer(spec, self.summary)
        if layer.calls != 1:
            raise UnsupportedModelError(
                f"layer {layer.index} ('{layer.name}') runs {layer.calls} times per forward pass",
                "cut at a layer that runs once",
            )
        gcut = self.splitter.cut_at(layer)
        self._check(gcut)
        self._cuts[gcut.end] = gcut
        end = self.splitter.order[self.splitter.by_name[gcut.end]] + 1
        return Cut(layer.index, layer.name, layer.alias, end, gcut.features, gcut.out_shape, gcut.end, gcut.frontier)

    def _check(self, gcut: GraphCut) -> None:
        """post(pre(x)) must compute the model at a batch size the graph was not probed with."""
        like = probe_batch(self.model, self.input_shape, 1)
        if like.device.type == "meta":  # a shape-only rebuild (checkpoint checks) has no values to compare
            return
        x = torch.randn(5, *self.input_shape, generator=torch.Generator().manual_seed(0)).to(like)
        try:
            with torch.no_grad():
                want = self.model(x)
                got = self.splitter.post_model(gcut)(self.splitter.pre_model(gcut)(x))
            same = got.shape == want.shape and float((got - want).abs().max()) <= 1e-4 * (1.0 + float(want.abs().max()))
        except Exception:  # any failure of the split graphs is a refusal, not a crash
            same = False
        if not same:
            raise UnsupportedModelError(
                f"the cut after layer {gcut.layer.index} ('{gcut.layer.name}') does not reproduce the model "
                "(the graph passes something other than per-sample tensors across it)",
                "cut at a block boundary (the output of a residual block or stage; 'odekit info' lists the layers)",
            )

    def _graph_cut(self, cut: Cut) -> GraphCut:
        assert cut.node is not None
        return self._cuts[cut.node]

    def pre_model(self, cut: Cut) -> nn.Module:
        return self.splitter.pre_model(self._graph_cut(cut))

    def post_model(self, cut: Cut) -> nn.Module:
        return self.splitter.post_model(self._graph_cut(cut))

    def analysable_layers(self) -> list[int]:
        last = len(self.summary.layers)
        return [layer.index for layer in self.summary.layers if layer.index < last and layer.calls == 1]

    def gradient_model(self, cut: Cut) -> tuple[nn.Module, nn.Module]:
        pre = self.pre_model(cut)
        return nn.Sequential(pre, self.post_model(cut)).eval(), pre


CutModel = ChainModel | GraphModel


def cut_model(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> CutModel:
    """Every model is cut on its traced graph (``GraphModel``): the graph is what the forward
    pass computes, whereas a chain of children skips whatever forward() does between them.
    ``ChainModel`` stays for rebuilding ASNets recorded with a chain cut."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError("ASNet needs the model's modules, not a TorchScript archive", TORCHSCRIPT_HINT)
    return GraphModel(runnable(model, input_shape), input_shape)
