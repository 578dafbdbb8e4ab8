"""RON student construction: exactness on exactly low-rank activations, BN folding, conv maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odekit.errors import LayerSelectionError, NumericalError, UnsupportedModelError, UsageError
from odekit.io.checkpoints import ModelMeta, load_model, save_model
from odekit.methods.ron import (
    RonSettings,
    analyse_region,
    build_student,
    conv_rows,
    fold_batchnorm,
)
from odekit.models.layers import total_flops
from odekit.models.registry import build_model


def _cone_mlp(seed: int = 0, rank: int = 3):
    """An MLP whose hidden activations are exactly rank ``rank`` on inputs x = C u, u > 0."""
    g = torch.Generator().manual_seed(seed)
    d_in, h1, h2, k = 20, 30, 25, 5
    model = (
        build_model("mlp", {"in_features": d_in, "hidden": [h1, h2], "num_classes": k})
        .double()
        .eval()
    )
    c = torch.randn(d_in, rank, generator=g, dtype=torch.float64)
    u1 = torch.rand(
        h1, rank, generator=g, dtype=torch.float64
    )  # nonnegative: ReLU acts as identity
    u2 = torch.rand(h2, rank, generator=g, dtype=torch.float64)
    p = torch.rand(rank, rank, generator=g, dtype=torch.float64) + 0.1
    with torch.no_grad():
        model[1].weight.copy_(u1 @ torch.linalg.pinv(c))
        model[1].bias.zero_()
        model[3].weight.copy_(u2 @ p @ torch.linalg.pinv(u1))
        model[3].bias.zero_()
        model[5].weight.copy_(torch.randn(k, h2, generator=g, dtype=torch.float64))
        model[5].bias.copy_(torch.randn(k, generator=g, dtype=torch.float64))

    def sample(n: int, s: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(s)
        u = torch.rand(n, rank, generator=gen, dtype=torch.float64) + 0.5
        return u @ c.T

    return model, {"in_features": d_in, "hidden": [h1, h2], "num_classes": k}, sample


@pytest.mark.parametrize("sketch_size", [None, 8])
def test_student_is_exact_when_activations_have_rank_r(sketch_size):
    model, args, sample = _cone_mlp()
    x_train, x_test = sample(200, 1), sample(50, 2)
    with torch.no_grad():
        z1 = torch.relu(model[1](x_train))
    assert int(torch.linalg.matrix_rank(z1)) == 3
    settings = RonSettings(
        layers="1-3", rank="3,3,4", oversample=1.5, sketch_size=sketch_size, batch_size=64
    )
    res = build_student(model, "mlp", args, (20,), x_train, settings)
    assert res.ranks == [3, 3, 4]  # the logits are affine in z2: rank 3 + bias
    assert [layer.rows for layer in res.layers] == [5, 5, 5]
    with torch.no_grad():
        t, s = model(x_test), res.student(x_test)
    assert torch.allclose(s, t, atol=1e-9 * float(t.abs().max()))
    assert total_flops(res.student.float(), (20,)) < total_flops(model.float(), (20,))
    for layer in res.layers:
        assert layer.residual_energy < 1e-12
        assert 1.0 <= layer.amplification <= layer.error_factor + 1e-9 or layer.rows == layer.dim


def _proto_batches(shape, n_proto: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_proto, *shape, generator=g, dtype=torch.float64)
    idx = torch.arange(n) % n_proto
    return protos, protos[idx]


def _random_bn_stats(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)


def test_conv_bn_maxpool_student_exact_on_rank_r_data():
    args = {"num_classes": 10, "width": 0.125, "in_channels": 1, "image_size": 32}
    torch.manual_seed(0)
    model = build_model("vgg11_bn", args)
    _random_bn_stats(model, 0)
    model = model.double().eval()
    protos, x = _proto_batches((1, 32, 32), 4, 40, seed=3)
    res = build_student(
        model, "vgg11_bn", args, (1, 32, 32), x, RonSettings(layers="3-8", rank="4", batch_size=16)
    )
    assert all(r == 4 for r in res.ranks)
    assert any(layer.pooled for layer in res.layers)
    with torch.no_grad():
        t, s = model(protos), res.student(protos)
    assert torch.allclose(s, t, atol=1e-8 * float(t.abs().max()))
    assert total_flops(res.student.float(), (1, 32, 32)) < total_flops(model.float(), (1, 32, 32))


def test_residual_sums_eq_5_16_exact_on_rank_r_data():
    args = {"num_classes": 10, "width": 0.25, "in_channels": 1}
    torch.manual_seed(1)
    model = build_model("resnet20", args)
    _random_bn_stats(model, 1)
    model = model.double().eval()
    protos, x = _proto_batches((1, 16, 16), 3, 30, seed=4)
    # layers 2-9: three stage-1 blocks and the first (down-sampling, option-A shortcut) stage-2 block
    res = build_student(
        model, "resnet20", args, (1, 16, 16), x, RonSettings(layers="2-9", rank="3", batch_size=16)
    )
    assert any(
        "input" in layer.sources and len(layer.sources) == 2 for layer in res.layers
    )  # x_in shortcut
    assert any(len(layer.sources) == 2 and "input" not in layer.sources for layer in res.layers)
    with torch.no_grad():
        t, s = model(protos), res.student(protos)
    assert torch.allclose(s, t, atol=1e-8 * float(t.abs().max()))


def test_student_roundtrip_through_safetensors(tmp_path):
    model, args, sample = _cone_mlp()
    model = model.float()
    res = build_student(
        model, "mlp", args, (20,), sample(100, 1).float(), RonSettings(layers="1-2", rank="3")
    )
    meta = ModelMeta(arch="mlp", args=args, num_classes=5, input_shape=[20])
    path = save_model(
        tmp_path / "s.safetensors", res.student, meta.derived("ron_student", res.args, {}, "x")
    )
    loaded = load_model(path)
    x = sample(7, 9).float()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), res.student(x))
    assert loaded.meta.arch == "ron_student"


def test_fold_batchnorm_is_exact():
    g = torch.Generator().manual_seed(0)
    for conv, bn, shape in [
        (nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), (4, 3, 8, 8)),
        (nn.Conv2d(3, 6, 3, stride=2, bias=True), nn.BatchNorm2d(6), (4, 3, 9, 9)),
        (nn.Linear(7, 5), nn.BatchNorm1d(5), (4, 7)),
    ]:
        conv, bn = conv.double(), bn.double()
        _random_bn_stats(nn.Sequential(bn), 1) if isinstance(bn, nn.BatchNorm2d) else None
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
        bn.eval()
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        fused = fold_batchnorm(conv, bn)
        with torch.no_grad():
            assert torch.allclose(fused(x), bn(conv(x)), atol=1e-12)
    with pytest.raises(UsageError):
        fold_batchnorm(nn.ReLU(), nn.BatchNorm1d(3))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 1)])
def test_conv_as_linear_map_equals_the_conv(stride, padding):
    g = torch.Generator().manual_seed(stride + padding)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding).double()
    in_shape = (3, 7, 7)
    x = torch.randn(5, *in_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = (conv(x) - conv.bias.view(1, -1, 1, 1)).reshape(5, -1)
    rows = torch.randperm(y.shape[1], generator=g)[:11]
    m = conv_rows(conv, in_shape, rows, chunk=4)  # 11 sampled rows, never the dense map
    assert m.shape == (11, 3 * 7 * 7)
    assert torch.allclose(x.reshape(5, -1) @ m.T, y[:, rows], atol=1e-12)
    # applying the conv to basis columns reshaped as feature maps = the linear map times V
    v = torch.randn(3 * 7 * 7, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lv = (conv(v.T.reshape(6, *in_shape)) - conv.bias.view(1, -1, 1, 1)).reshape(6, -1).T
    assert torch.allclose(lv[rows], m @ v, atol=1e-12)


def test_bad_ranges_and_ranks_are_clear_errors():
    args = {"num_classes": 10, "width": 0.25, "in_channels": 1}
    resnet = build_model("resnet20", args).eval()
    with pytest.raises(LayerSelectionError, match="residual"):
        analyse_region(resnet, (1, 16, 16), "2-2")  # ends inside a block
    with pytest.raises(LayerSelectionError, match=r"self-contained|residual"):
        analyse_region(resnet, (1, 16, 16), "3-5")  # starts inside a block

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x)).unsqueeze(1)
            h, _ = self.attn(h, h, h)
            return self.fc2(h.squeeze(1))

    # attention is opened up (layers: fc1, attn.in_proj = fc2, attn.out_proj = fc3, fc4)
    with pytest.raises(UnsupportedModelError, match=r"unsupported op.*after layer fc2"):
        analyse_region(Attn().eval(), (8,), "1-4")
    gelu = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2)).eval()
    with pytest.raises(UnsupportedModelError, match="GELU"):
        analyse_region(gelu, (6,), "1-2")

    model, margs, sample = _cone_mlp()
    x = sample(40, 1)
    with pytest.raises(NumericalError, match="samples"):
        build_student(model, "mlp", margs, (20,), x[:2], RonSettings(layers="1-1", rank="3"))
    with pytest.raises(NumericalError, match="data allows"):
        build_student(model, "mlp", margs, (20,), x, RonSettings(layers="1-1", rank="10"))
    with pytest.raises(NumericalError, match="layer dimension"):
        build_student(model, "mlp", margs, (20,), x, RonSettings(layers="1-3", rank="3,3,8"))
    with pytest.raises(UsageError, match="2 ranks"):
        build_student(model, "mlp", margs, (20,), x, RonSettings(layers="1-3", rank="3,3"))
    with pytest.raises(UsageError):
        RonSettings(layers="1-3", oversample=0.5)
    with pytest.raises(UsageError):
        RonSettings(layers="1-3", rank="energy:2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_student_on_cuda_matches_cpu():
    model, args, sample = _cone_mlp()
    x = sample(120, 1)
    settings = RonSettings(layers="1-3", rank="3,3,4")
    cpu = build_student(model, "mlp", args, (20,), x, settings)
    gpu = build_student(model, "mlp", args, (20,), x, settings, device="cuda")
    xt = sample(10, 3)
    with torch.no_grad():
        assert torch.allclose(gpu.student(xt.cuda()).cpu(), cpu.student(xt), atol=1e-8)
