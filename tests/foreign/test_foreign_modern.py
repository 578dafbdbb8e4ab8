"""Modern blocks in every format: a torchvision ViT (custom configuration), a ConvNeXt-style
network and an inverted-residual network with SiLU and squeeze-excitation (tests/foreign/zoo.py).

Replayed from the issue: one layer table whatever the format (attention projections are rows,
attention matmuls count in the total as FlopCounterMode counts them), ASNet cuts the traced graph
at block boundaries (a dynamic .pt2 batch never crosses a cut), attacks run in every format.
``reduce --mode channel`` on every zoo model: tests/foreign/test_foreign_channel.py."""

from __future__ import annotations

import json

import pytest
import torch
from foreign_models import FORMATS, MODERN, ForeignModel
from methods_support import dataset, teacher
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.errors import UnsupportedModelError
from odekit.methods.asnet import GraphModel
from odekit.models.layers import LayerInfo, resolve_layers

# a block boundary of each model (the cut the user asked for) and a --layers range
BLOCK_END = {
    "vit": "encoder.layers.encoder_layer_0.mlp.3",
    "convnext": "stages.0.pwconv2",
    "mbconv": "blocks.0.project.0",
}


def _pairs(models: tuple[str, ...], formats: tuple[str, ...], quick: set[tuple[str, str]]) -> list:
    """(model, format) parameters; those not in ``quick`` run with -m slow."""
    return [
        pytest.param(m, f, marks=() if (m, f) in quick else pytest.mark.slow, id=f"{m}-{f}")
        for m in models
        for f in formats
    ]


def _load_args(model: ForeignModel, fmt: str) -> list[str]:
    """What a user passes: only a .pt2 records its input shape; the others take it from --data."""
    extra = ["--data", str(model.data)] if fmt != "export" else []
    return [*model.args(fmt), *extra]


def _info(model: ForeignModel, fmt: str) -> dict:
    result = CliRunner().invoke(app, ["info", *_load_args(model, fmt), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _reference_flops(model: ForeignModel) -> int:
    """FlopCounterMode on the eager model, attention through the math kernel (counted matmuls)."""
    net = teacher(model, "module")
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        net(torch.zeros(1, *model.input_shape))
    return int(counter.get_total_flops())


def _rows(report: dict) -> list[tuple]:
    return [(la["name"], la["type"], la["in_shape"], la["out_shape"], la["params"], la["flops"]) for la in report["layers"]]


@pytest.mark.parametrize(("name", "fmt"), _pairs(("vgg", "mlp", *MODERN), FORMATS, {("vit", "export"), ("convnext", "torchscript"), ("mbconv", "pickle")}))
def test_one_layer_table_whatever_the_format(foreign, name, fmt) -> None:
    model = foreign(name)
    report, reference = _info(model, fmt), _info(model, "state")
    assert _rows(report) == _rows(reference) and report["params"] == reference["params"]
    assert report["flops"] == _reference_flops(model)
    assert report["layer_flops"] + report["other_flops"] == report["flops"]
    assert sum(la["flops"] for la in report["layers"]) == report["layer_flops"]
    layers = [LayerInfo(**la) for la in report["layers"]]
    assert [la.name for la in resolve_layers("2-3", layers)] == [la["name"] for la in reference["layers"][1:3]]


def test_vit_attention_projections_are_rows_with_true_flops(foreign) -> None:
    """hidden 32, 2 heads, 16 tokens + the class token: in_proj 17x32 -> 17x96, out_proj 17x32 -> 17x32."""
    report = _info(foreign("vit"), "export")
    rows = {la["name"]: la for la in report["layers"]}
    in_proj = rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    out_proj = rows["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert (in_proj["in_shape"], in_proj["out_shape"], in_proj["flops"]) == ([17, 32], [17, 96], 2 * 17 * 32 * 96)
    assert (out_proj["in_shape"], out_proj["out_shape"], out_proj["flops"]) == ([17, 32], [17, 32], 2 * 17 * 32 * 32)
    # per layer: Q K^T and A V, 2 heads of 16 dims over 17 tokens, 2 FLOPs per multiply-add; 2 layers
    assert report["other_flops"] == 2 * (2 * 2 * 2 * 17 * 17 * 16)


@pytest.mark.parametrize("fmt", ["export", pytest.param("module", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", MODERN)
def test_cuts_at_every_block_boundary_reproduce_the_model(foreign, name, fmt) -> None:
    """Every layer but those inside attention can be cut; post(pre(x)) is the model at any batch size."""
    model = foreign(name)
    net = teacher(model, fmt)
    graph = GraphModel(net, model.input_shape)
    x = dataset(model).test.x[:7]
    refused = []
    for index in graph.analysable_layers():
        try:
            cut = graph.cut(index)
        except UnsupportedModelError as exc:
            refused.append((graph.summary.layers[index - 1].name, str(exc)))
            continue
        with torch.no_grad():
            assert float((graph.post_model(cut)(graph.pre_model(cut)(x)) - net(x)).abs().max()) < 1e-4
    assert all(n.endswith("in_proj") and "inside attention" in e for n, e in refused), refused
    assert BLOCK_END[name] not in [n for n, _ in refused]


def _asnet(model: ForeignModel, fmt: str, out) -> object:
    return CliRunner().invoke(app, [
        "asnet", *model.args(fmt), *model.data_args(), "--cut", BLOCK_END[model.name], "--rank", "4",
        "--samples", "300", "--no-baselines", "--no-latency", "-o", str(out), "--json",
    ])  # fmt: skip


@pytest.mark.parametrize(("name", "fmt"), _pairs(MODERN, ("pickle", "state", "export"), {("vit", "export"), ("convnext", "state")}))
def test_asnet_cuts_modern_blocks_in_every_format(foreign, name, fmt, tmp_path) -> None:
    model = foreign(name)
    result = _asnet(model, fmt, tmp_path / "run")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)["results"]
    assert r["cut"]["name"] == BLOCK_END[name] and r["cut"]["node"]
    program = torch.export.load(str(tmp_path / "run" / "asnet.pt2")).module()  # dynamic batch, no odekit needed
    data = dataset(model)
    with torch.no_grad():
        acc = float((program(data.test.x).argmax(1) == data.test.y).float().mean())
    assert acc == pytest.approx(r["asnet"]["accuracy"], abs=1e-6)


def test_asnet_refuses_torchscript_in_one_line(foreign, tmp_path) -> None:
    result = _asnet(foreign("vit"), "torchscript", tmp_path / "run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "TorchScript" in lines[0] and "torch.export" in lines[0]


@pytest.mark.parametrize(("name", "fmt"), _pairs(MODERN, FORMATS, {("vit", "export"), ("mbconv", "pickle")}))
def test_attack_modern_blocks_in_every_format(foreign, name, fmt, tmp_path) -> None:
    model = foreign(name)
    result = CliRunner().invoke(app, [
        "attack", *model.args(fmt), *model.data_args(), "--method", "active-subspace", "--delta", "2",
        "--fit-samples", "40", "--max-iter", "3", "--eval-samples", "120", "-o", str(tmp_path / "a"), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)["results"]
    assert r["norm_pixel"] <= 2.0 + 1e-4
    assert r["robust_accuracy"] <= r["clean_accuracy"] + 0.05
