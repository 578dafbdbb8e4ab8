"""Layer table, FLOP convention and layer-spec resolution."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from odekit.errors import LayerSelectionError
from odekit.models import build_model
from odekit.models.layers import layer_table, resolve_layers

MODELS = [
    ("lenet300", {}, (1, 28, 28)),
    ("lenet5", {}, (1, 28, 28)),
    ("vgg11_bn", {"width": 0.25, "in_channels": 1}, (1, 32, 32)),
    ("vgg19", {"width": 0.125}, (3, 32, 32)),
    ("resnet20", {"width": 0.5}, (3, 32, 32)),
    ("mlp", {"in_features": 10, "hidden": [7, 5]}, (10,)),
]


@pytest.mark.parametrize(("arch", "args", "shape"), MODELS)
def test_layer_flops_match_flop_counter_mode(arch: str, args: dict, shape: tuple) -> None:
    model = build_model(arch, args).eval()
    summary = layer_table(model, shape)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *shape))
    assert sum(layer.flops for layer in summary.layers) == counter.get_total_flops() == summary.flops
    assert summary.params == sum(p.numel() for p in model.parameters())
    assert [layer.index for layer in summary.layers] == list(range(1, len(summary.layers) + 1))


def test_vgg19_has_sixteen_convs_and_textbook_flops() -> None:
    summary = layer_table(build_model("vgg19_bn", {"num_classes": 10}), (3, 32, 32))
    convs = [layer for layer in summary.layers if layer.type == "Conv2d"]
    assert len(convs) == 16 and len(summary.layers) == 17
    # about 398 M multiply-adds for CIFAR VGG-19 (methods.md); FLOPs are twice that
    assert 0.79e9 < summary.flops < 0.81e9


def test_resolve_specs() -> None:
    summary = layer_table(build_model("vgg11_bn", {"width": 0.25, "in_channels": 1}), (1, 32, 32))
    assert [layer.index for layer in resolve_layers("3-6", summary)] == [3, 4, 5, 6]
    assert [layer.index for layer in resolve_layers("conv3-conv6", summary)] == [3, 4, 5, 6]
    assert [layer.index for layer in resolve_layers("5", summary)] == [5]
    assert [layer.index for layer in resolve_layers("features.0,fc9", summary)] == [1, 9]
    assert [layer.index for layer in resolve_layers("1, 2-3, 2", summary)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("spec", "match"),
    [("12", "out of range"), ("fc3", "not fc"), ("6-3", "backwards"), ("banana", "unknown layer"), ("", "empty")],
)
def test_bad_specs_raise_clear_errors(spec: str, match: str) -> None:
    summary = layer_table(build_model("vgg11_bn", {"width": 0.25, "in_channels": 1}), (1, 32, 32))
    with pytest.raises(LayerSelectionError, match=match):
        resolve_layers(spec, summary)
