"""ASNet on models odekit did not build: graph cuts of the module and of its .pt2 aten graph."""

from __future__ import annotations

import pytest
import torch
from methods_support import agreement, dataset, max_abs_diff, teacher

from odekit.io.exported import save_exported
from odekit.methods.asnet import (
    ASNetSettings,
    GraphModel,
    SubspaceSettings,
    build_asnet_from_teacher,
    cut_model,
)


def _settings(cut: str, rank: int) -> ASNetSettings:
    return ASNetSettings(
        cut=cut, rank=rank, baselines=False, latency=False, subspace=SubspaceSettings(samples=800, batch_size=200)
    )


@pytest.mark.parametrize("fmt", ["module", "export"])
def test_asnet_cuts_a_foreign_vgg_anywhere_and_writes_a_pt2(foreign_vgg, fmt, tmp_path) -> None:
    net, data = teacher(foreign_vgg, fmt), dataset(foreign_vgg)
    shape = tuple(foreign_vgg.input_shape)
    graph = cut_model(net, shape)
    assert isinstance(graph, GraphModel)  # a view() in forward: not a chain of modules
    assert graph.analysable_layers() == list(range(1, 17))
    cut = graph.cut("conv12")
    assert cut.features == 32 * 2 * 2  # conv12 -> BN -> ReLU -> max-pool, 32 channels at 2x2
    built = build_asnet_from_teacher(net, "foreign", {}, shape, data, _settings("conv12", 12), torch.device("cpu"))
    res = built.results
    assert not built.registered
    assert res["flop_reduction"] > 1.0
    assert agreement(net, built.model.eval(), data.test.x) >= 0.9
    assert res["asnet"]["accuracy"] >= res["teacher"]["accuracy"] - 0.1
    if fmt != "export":
        return
    path = save_exported(tmp_path / "asnet.pt2", built.model, shape, '{"arch": "asnet"}')
    reloaded = torch.export.load(str(path)).module()
    assert max_abs_diff(reloaded, built.model, data.test.x[:64]) < 1e-5


def test_asnet_cut_inside_a_resnet_block_carries_the_skip_tensor(foreign_resnet) -> None:
    net, data = teacher(foreign_resnet, "export"), dataset(foreign_resnet)
    shape = tuple(foreign_resnet.input_shape)
    graph = GraphModel(net, shape)
    cut = graph.cut("layer4.1.conv1")  # the block input travels with relu(bn1) to the sum
    assert cut.frontier is not None and len(cut.frontier) == 2
    assert cut.features == 2 * 512  # 512 channels at 1x1, twice
    x = data.test.x[:8]
    with torch.no_grad():
        assert float((graph.post_model(cut)(graph.pre_model(cut)(x)) - net(x)).abs().max()) < 1e-4


@pytest.mark.slow
def test_asnet_on_torchvision_resnet18(foreign_resnet) -> None:
    net, data = teacher(foreign_resnet, "module"), dataset(foreign_resnet)
    built = build_asnet_from_teacher(
        net, "foreign", {}, tuple(foreign_resnet.input_shape), data, _settings("layer4.1.conv1", 10), torch.device("cpu")
    )
    assert built.results["cut"]["n_l"] == 1024
    assert built.results["flop_reduction"] > 1.0
    assert agreement(net, built.model.eval(), data.test.x[:200]) >= 0.5
