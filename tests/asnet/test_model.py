"""Cutting teachers, the registered `asnet` architecture and the ASNet-s proximal step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odekit.errors import CheckpointError, LayerSelectionError, UnsupportedModelError, UsageError
from odekit.io.checkpoints import ModelMeta, load_model, save_model
from odekit.methods.asnet import (
    ASNetSettings,
    ChainModel,
    _l1_prox,
    build_asnet,
    max_rank_for_samples,
    parse_rank,
    sparse_cost,
)
from odekit.methods.pce import basis_size
from odekit.models import build_model


@pytest.mark.parametrize(
    ("arch", "args", "shape", "cut", "n_l"),
    [
        ("lenet300", {}, (1, 28, 28), "1", 300),
        ("lenet5", {}, (1, 28, 28), "conv2", 400),  # conv + ReLU + pool + flatten
        ("vgg11_bn", {"width": 0.25, "in_channels": 1}, (1, 32, 32), "5", 128 * 4 * 4),
        ("vgg11_bn", {"width": 0.25, "in_channels": 1}, (1, 32, 32), "features.11", 64 * 4 * 4),
    ],
)
def test_cut_sizes_on_zoo_models(arch: str, args: dict, shape: tuple, cut: str, n_l: int) -> None:
    model = build_model(arch, {"num_classes": 10, **args}).eval()
    chain = ChainModel(model, shape)
    c = chain.cut(cut)
    assert c.features == n_l
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(chain.post_model(c)(chain.pre_model(c)(x)), model(x), atol=1e-5)


def test_residual_models_and_bad_cuts_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="plain chain"):
        ChainModel(build_model("resnet20", {"num_classes": 10}).eval(), (3, 32, 32))
    chain = ChainModel(build_model("lenet300", {"num_classes": 10}).eval(), (1, 28, 28))
    with pytest.raises(LayerSelectionError, match="last compute layer"):
        chain.cut("3")
    with pytest.raises(LayerSelectionError):
        chain.cut("1-2")
    with pytest.raises(LayerSelectionError):
        chain.cut("9")


def test_asnet_architecture_round_trips_through_safetensors(tmp_path) -> None:
    args = {"teacher_arch": "lenet5", "teacher_args": {"num_classes": 10}, "cut": 2, "end": 7,
            "features": 400, "rank": 6, "degree": 2, "num_classes": 10}  # fmt: skip
    model = build_asnet(**args).eval()
    assert model.pce.n_basis == basis_size(6, 2) == 28
    meta = ModelMeta(arch="asnet", args=args, num_classes=10, input_shape=[1, 28, 28])
    save_model(tmp_path / "a.safetensors", model, meta)
    loaded = load_model(tmp_path / "a.safetensors")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert "pce.gather_index" not in loaded.model.state_dict()  # rebuilt, not stored
    with pytest.raises(CheckpointError):  # wrong rank for the stored weights
        save_model(tmp_path / "b.safetensors", build_asnet(**{**args, "rank": 5}), meta)
        load_model(tmp_path / "b.safetensors")


def test_l1_proximal_step_is_soft_thresholding() -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.05, 0.2], [-0.3, 0.1, 0.0]]))
    _l1_prox(l1=1.0)(nn.Sequential(layer), lambda _: 0.1)
    want = torch.tensor([[0.4, 0.0, 0.1], [-0.2, 0.0, 0.0]])
    assert torch.allclose(layer.weight, want, atol=1e-7)
    cost = sparse_cost(nn.Sequential(layer), (3,))
    assert cost["nonzero_params"] == 3 + 2  # three weights and both biases
    assert cost["flops_nonzero"] == round(2 * 2 * 3 * 0.5)


def test_rank_rules_and_settings_validation() -> None:
    # 2 C(r+2, 2) <= 1437 holds up to r = 36 (703 basis functions), not r = 37 (741)
    assert max_rank_for_samples(1437, 2) == 36
    assert parse_rank(None) is None and parse_rank("AUTO") == "auto" and parse_rank("12") == 12
    with pytest.raises(UsageError):
        parse_rank("many")
    with pytest.raises(UsageError):
        ASNetSettings(cut="2", rank=0)
    with pytest.raises(UsageError):
        ASNetSettings(cut="2", sparse=True)  # proximal steps need fine-tuning epochs
    with pytest.raises(UsageError):
        ASNetSettings(cut="2", beta=1.5)
    with pytest.raises(UsageError):
        ASNetSettings(cut="2", degree=0)
