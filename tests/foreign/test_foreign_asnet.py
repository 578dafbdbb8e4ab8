"""ASNet on models odekit did not build: graph cuts of the module and of its .pt2 aten graph."""

from __future__ import annotations

import json

import pytest
import torch
from methods_support import agreement, dataset, max_abs_diff, teacher
from typer.testing import CliRunner

from odekit.cli.app import app
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


@pytest.mark.slow
def test_asnet_cuts_a_foreign_vgg_anywhere_and_writes_a_pt2(foreign_vgg, tmp_path) -> None:
    net, data = teacher(foreign_vgg, "export"), dataset(foreign_vgg)
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
    path = save_exported(tmp_path / "asnet.pt2", built.model, shape, '{"arch": "asnet"}')
    reloaded = torch.export.load(str(path)).module()
    assert max_abs_diff(reloaded, built.model, data.test.x[:64]) < 1e-5


def test_asnet_cli_on_a_state_dict_with_user_arch_writes_a_pt2(foreign_vgg, tmp_path) -> None:
    out = tmp_path / "run"
    args = [*foreign_vgg.args("state"), *foreign_vgg.data_args(), "--cut", "conv12", "--rank", "8", "--samples", "600",
            "--no-baselines", "--no-latency", "-o", str(out), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, ["asnet", *args])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)["results"]
    assert r["checkpoint"] == str(out / "asnet.pt2") and not (out / "asnet.safetensors").exists()
    assert r["cut"]["n_l"] == 128 and r["cut"]["node"]
    assert r["flop_reduction"] > 1.0
    assert r["asnet"]["accuracy"] >= r["teacher"]["accuracy"] - 0.1
    program = torch.export.load(str(out / "asnet.pt2")).module()  # no odekit, no user code needed
    x = dataset(foreign_vgg).test.x
    with torch.no_grad():
        acc = float((program(x).argmax(1) == dataset(foreign_vgg).test.y).float().mean())
    assert acc == pytest.approx(r["asnet"]["accuracy"], abs=1e-6)


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
