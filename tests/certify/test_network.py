"""Network bounds on traced graphs: BatchNorm folding is exact, residual sums add, refusals are
one clear error, and the certificate is sound (PGD inside r_i never flips a certified sample)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odekit.linalg.lipschitz import ConvSpec, dense_conv_matrix
from odekit.methods.certify.certificate import SQRT2, certified_radii, local_lower, margins
from odekit.methods.certify.network import BoundSettings, folded_weight, network_bound
from odekit.methods.certify.ops import NotCertifiable
from odekit.models.graph import trace_graph


def _bound(model: nn.Module, shape: tuple[int, ...]):
    gm = trace_graph(model.eval(), shape)
    return network_bound(gm, torch.zeros(1, *shape, dtype=next(model.parameters()).dtype), BoundSettings(), {})


def _with_stats(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
    bn.weight.data.copy_(torch.randn(c, generator=g))
    bn.bias.data.copy_(torch.randn(c, generator=g))
    return bn.eval()


def test_batchnorm_folding_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True).double()
    bn = _with_stats(nn.BatchNorm2d(5).double(), 1)
    x0 = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: bn(conv(x)), x0).reshape(5 * 36, 3 * 36)
    folded = dense_conv_matrix(folded_weight(conv, bn), ConvSpec.of((6, 6), 1, 1))
    assert torch.allclose(jac, folded, atol=1e-12)
    nb = _bound(nn.Sequential(conv, bn), (3, 6, 6))
    assert [layer.kind for layer in nb.layers] == ["conv"] and "folded" in nb.layers[0].note
    exact = float(torch.linalg.matrix_norm(jac, 2))
    assert nb.layers[0].bound.lower <= exact * (1 + 1e-9) <= nb.upper * (1 + 1e-9)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        y = x + 0.5 * F.relu(self.conv(x))
        return self.fc(torch.flatten(y, 1))


def test_residual_sum_and_chain_product():
    torch.manual_seed(1)
    model = Residual()
    nb = _bound(model, (4, 5, 5))
    conv, fc = (layer.bound.upper for layer in nb.layers if layer.kind in ("conv", "linear"))
    assert nb.upper == pytest.approx((1 + 0.5 * conv) * fc, rel=1e-9)
    x = torch.randn(16, 4, 5, 5)
    assert local_lower(model, x, 8) * SQRT2 / SQRT2 <= nb.upper


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.fc(x))


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)

    def forward(self, x):
        h = self.q(x)
        return torch.softmax(h @ h.transpose(-1, -2), -1) @ h


@pytest.mark.parametrize("model,word", [(WithLayerNorm(), "LayerNorm"), (SelfAttention(), "multiplies")])
def test_layernorm_and_attention_are_refused(model, word):
    with pytest.raises(NotCertifiable) as info:
        _bound(model, (6,))
    assert word in info.value.message


def _trained_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:600], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:600])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_pgd_inside_the_certified_radius_never_flips_a_certified_sample():
    model, x, y = _trained_mlp()
    nb = _bound(model, (64,))
    pred, gap, logits = margins(model, x, 256)
    plain = gap / (SQRT2 * nb.upper)
    assert nb.head_weight is not None  # the final linear layer: pairwise margins
    radius = certified_radii(logits, pred, nb.upper, nb.head_weight, nb.head_input_bound)
    assert bool((radius >= plain).all()) and float((radius / plain).median()) > 1.05
    radius = radius.float()
    certified = (pred == y) & (radius > 0)
    assert int(certified.sum()) > 100
    xs, ys, r = x[certified], y[certified], 0.999 * radius[certified]
    adv = xs.clone()
    for _ in range(40):  # l2 PGD with a per-sample radius, stepping on the margin loss
        adv.requires_grad_(True)
        logits = model(adv)
        other = logits.masked_fill(F.one_hot(ys, 10).bool(), -math.inf).amax(1)
        loss = (other - logits.gather(1, ys[:, None])[:, 0]).sum()
        (g,) = torch.autograd.grad(loss, adv)
        step = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        delta = adv.detach() + 0.25 * r[:, None] * step - xs
        delta = delta * torch.clamp(r[:, None] / delta.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        adv = xs + delta
    with torch.no_grad():
        assert bool((model(adv).argmax(1) == ys).all())
        # and the attack is not toothless: 20x the radius breaks some of them
        far = xs + 20 * (adv - xs)
        assert bool((model(far).argmax(1) != ys).any())


class GroupMax(nn.Module):
    """A RON-student-style max over groups of 4 flattened features, then an element-wise max."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        a = self.fc(x).reshape(x.shape[0], -1, 4).amax(dim=2)
        return self.head(torch.maximum(a, torch.clamp(a, min=0.0)))


def test_max_reductions_and_elementwise_max():
    torch.manual_seed(4)
    model = GroupMax()
    nb = _bound(model, (8,))
    fc, head = (layer.bound.upper for layer in nb.layers if layer.kind == "linear")
    assert nb.upper == pytest.approx(fc * math.sqrt(2) * head, rel=1e-9)
    assert local_lower(model, torch.randn(64, 8), 64) <= nb.upper
