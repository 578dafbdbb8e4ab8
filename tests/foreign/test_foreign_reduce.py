"""RON on models odekit did not build: the module itself, its .pt2 aten graph, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from methods_support import agreement, dataset, max_abs_diff, teacher
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.io.exported import save_exported
from odekit.methods.evaluation import model_cost
from odekit.methods.ron import RonSettings, build_student
from odekit.models.layers import layer_table

# model: (layers, rank at "full" rank, reduced rank, sketch rows)
CASES = {
    "vgg": ("13-16", "energy:0.999999", "factor:4", 128),  # last VGG-19 block: 32 channels at 2x2
    "mlp": ("1-2", "energy:0.999999", "8", 32),  # functional ReLUs
}


@pytest.mark.parametrize("name", [pytest.param("vgg", marks=pytest.mark.slow), "mlp"])
def test_ron_on_pt2_graphs_agrees_at_full_rank_and_cuts_flops(foreign, name, tmp_path) -> None:
    model = foreign(name)
    layers, full, reduced, sketch = CASES[name]
    net, data = teacher(model, "export"), dataset(model)
    shape = tuple(model.input_shape)
    train, test_x = data.train.x[:1000], data.test.x

    exact = build_student(net, "export", {}, shape, train, RonSettings(layers=layers, rank=full, sketch_size=sketch))
    assert agreement(net, exact.student, test_x) >= 0.95
    small = build_student(net, "export", {}, shape, train, RonSettings(layers=layers, rank=reduced, sketch_size=sketch))
    assert model_cost(small.student, shape).flops < model_cost(net, shape).flops
    assert agreement(net, small.student, test_x) >= 0.9

    # written as a self-contained .pt2: plain torch.export.load runs it without odekit's code
    path = save_exported(tmp_path / "student.pt2", small.student, shape, '{"arch": "ron_student"}')
    reloaded = torch.export.load(str(path)).module()
    assert max_abs_diff(reloaded, small.student, test_x[:64]) < 1e-5


def test_module_and_pt2_give_the_same_layer_table_and_student(foreign_vgg) -> None:
    module, program = teacher(foreign_vgg, "module"), teacher(foreign_vgg, "export")
    shape = tuple(foreign_vgg.input_shape)
    a, b = layer_table(module, shape), layer_table(program, shape)
    assert [(la.name, la.type, la.flops) for la in a.layers] == [(la.name, la.type, la.flops) for la in b.layers]
    assert len(a.layers) == 17 and a.flops == b.flops
    data = dataset(foreign_vgg)
    settings = RonSettings(layers="13-16", rank="factor:4", sketch_size=128)
    s1 = build_student(module, "foreign", {}, shape, data.train.x[:600], settings)
    s2 = build_student(program, "foreign", {}, shape, data.train.x[:600], settings)
    assert s1.ranks == s2.ranks
    assert max_abs_diff(s1.student, s2.student, data.test.x[:64]) < 1e-4


def test_reduce_cli_on_a_trusted_pickle_writes_a_self_contained_student(foreign_vgg, tmp_path) -> None:
    out = tmp_path / "run"
    args = [*foreign_vgg.args("pickle"), *foreign_vgg.data_args(), "--layers", "13-16", "--rank", "factor:4",
            "--samples", "600", "--latency-batch", "32", "-o", str(out), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, ["reduce", *args])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)["results"]
    assert r["flop_reduction"] > 1.0
    assert r["student"]["accuracy"] >= r["teacher"]["accuracy"] - 0.05
    assert r["agreement"] >= 0.9
    assert r["student_checkpoint"] == str(out / "student.pt2")
    assert not (out / "student.safetensors").exists()
    assert r["reload_max_abs_diff"] <= 1e-5
    info = CliRunner().invoke(app, ["info", str(out / "student.pt2"), "--json"])
    assert info.exit_code == 0, info.output
    table = json.loads(info.stdout)
    layers = table.get("layers") or table["results"]["layers"]
    names = [la["name"] for la in layers]  # the aten graph's layers, named after the teacher's modules
    assert all(n.startswith("pre.features.") for n in names[:12]) and names[-1] == "rest.classifier"


@pytest.mark.slow
def test_ron_on_torchvision_resnet18_last_block(foreign_resnet) -> None:
    net, data = teacher(foreign_resnet, "export"), dataset(foreign_resnet)
    shape = tuple(foreign_resnet.input_shape)
    # layer4.1 (conv19, conv20): a whole residual block, 512 channels at 1x1
    settings = RonSettings(layers="19-20", rank="energy:0.999999", sketch_size=512)
    result = build_student(net, "foreign", {}, shape, data.train.x[:700], settings)
    assert agreement(net, result.student, data.test.x[:200]) >= 0.95
