"""Active subspace via per-sample gradients and frequent directions (Algorithm 3, eq. 6.12-6.17)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odekit.io.checkpoints import load_model
from odekit.io.datasets import Split, load_dataset
from odekit.linalg import subspace_sin_theta
from odekit.methods.asnet import ActiveSubspace, ChainModel, SubspaceSettings, active_subspace

CPU = torch.device("cpu")


def _synthetic(d: int = 30, k: int = 4, classes: int = 5, seed: int = 0) -> tuple[nn.Sequential, torch.Tensor]:
    """c(x) = CE(h(W x)) after an identity first layer: every gradient lies in span(W^T), k dims."""
    torch.manual_seed(seed)
    first = nn.Linear(d, d)
    with torch.no_grad():
        first.weight.copy_(torch.eye(d))
        first.bias.zero_()
    w = nn.Linear(d, k)
    model = nn.Sequential(first, w, nn.Tanh(), nn.Linear(k, 16), nn.Tanh(), nn.Linear(16, classes))
    return model, w.weight.detach().double()


def _split(n: int, d: int, classes: int, seed: int = 1) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


def _exact_gradients(model: nn.Module, cut_end: int, split: Split) -> torch.Tensor:
    """Per-sample gradients one sample at a time (no batching, no sketch)."""
    pre, post = model[:cut_end], model[cut_end:]
    rows = []
    for x, y in zip(split.x, split.y, strict=True):
        a = pre(x[None]).detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(post(a), y[None])
        rows.append(torch.autograd.grad(loss, a)[0].flatten().double())
    return torch.stack(rows)


def test_recovers_known_active_subspace_of_g_of_wx() -> None:
    model, w = _synthetic()
    chain = ChainModel(model, (30,))
    cut = chain.cut(1)
    assert cut.features == 30 and cut.end == 1
    split = _split(203, 30, 5)  # 203 = batches of 64 + a ragged one: every batch must enter
    sub = active_subspace(chain, cut, split, SubspaceSettings(sketch_size=10, batch_size=64), CPU, keep=4)
    assert sub.n_samples == 203
    truth = torch.linalg.qr(w.T).Q  # (30, 4) orthonormal basis of span(W^T)
    assert subspace_sin_theta(truth, sub.V.double()) < 1e-5
    s = sub.singular_values
    assert float(s[4] / s[0]) < 1e-5  # nothing outside the 4-dim active subspace
    assert sub.active_neurons(0.05) <= 4
    assert abs(sub.total_energy - float(_exact_gradients(model, 1, split).pow(2).sum())) < 1e-5 * sub.total_energy


def test_sketch_spectrum_within_frequent_directions_bound_of_exact_svd() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 6))
    chain = ChainModel(model, (20,))
    cut = chain.cut(1)  # pre-model = Linear + ReLU, n_l = 40
    split = _split(300, 20, 6, seed=4)
    sub = active_subspace(chain, cut, split, SubspaceSettings(sketch_size=12, batch_size=50), CPU)
    exact = torch.linalg.svdvals(_exact_gradients(model, cut.end, split))
    gap = exact[:12].pow(2) - sub.singular_values[:12].double().pow(2)
    # Frequent directions: 0 <= sigma_i(G)^2 - sigma_i(S)^2 <= delta <= ||G - G_k||_F^2 / (ell - k)
    assert float(gap.min()) > -1e-9 * float(exact[0] ** 2)
    assert float(gap.max()) <= sub.covariance_error * (1 + 1e-9) + 1e-12
    k = 4
    assert sub.covariance_error <= float(exact[k:].pow(2).sum()) / (12 - k) * (1 + 1e-9)


def test_active_counts_and_eps_on_a_known_spectrum() -> None:
    # lambda = s^2 = 50, 30, 15, 4, 1 (total 100)
    s = torch.tensor([50.0, 30.0, 15.0, 4.0, 1.0], dtype=torch.float64).sqrt()
    sub = ActiveSubspace(s, torch.eye(5), 100.0, 0.0, 10, torch.zeros(5), 0.0)
    assert sub.active_neurons_eq612(0.05) == 3  # 0.5, 0.8, 0.95 >= 0.95
    assert sub.active_neurons_eq612(0.11) == 3  # 0.8 < 0.89
    assert sub.active_neurons(0.11) == 2  # eq. 6.17: sqrt(0.8) = 0.894 >= 0.89
    assert sub.active_neurons(0.01) == 4  # sqrt(0.99) = 0.995 >= 0.99
    assert sub.eps_at_rank(2) == pytest.approx(0.2)
    # with energy outside the sketch (total 200), eq. 6.12 counts against the exact trace
    sub_tail = ActiveSubspace(s, torch.eye(5), 200.0, 0.0, 10, torch.zeros(5), 0.0)
    assert sub_tail.eps_at_rank(5) == pytest.approx(0.5)
    assert sub_tail.active_neurons_eq612(0.6) == 2  # 80 / 200 >= 0.4
    assert sub_tail.active_neurons_eq612(0.75) == 1  # 50 / 200 >= 0.25


def test_before_last_linear_layer_active_subspace_has_at_most_k_minus_1_dims(checkpoints_dir) -> None:
    """Cut at LeNet-300 layer 2: c(x) = CE(W3 x + b), grad = W3^T (softmax - e_y), so the active
    subspace is span(W3^T P) with P the centring projection, 9 dims for 10 classes."""
    loaded = load_model(checkpoints_dir / "lenet300_digits.safetensors")
    data = load_dataset("digits", input_shape=loaded.meta.input_shape, normalization=loaded.meta.normalization)
    chain = ChainModel(loaded.model, loaded.meta.input_shape)
    cut = chain.cut("fc2")
    assert cut.features == 100
    sub = active_subspace(chain, cut, data.train, SubspaceSettings(samples=300, sketch_size=20), CPU, keep=9)
    w3 = loaded.model[-1].weight.detach().double()  # (10, 100)
    p = torch.eye(10, dtype=torch.float64) - 1.0 / 10
    truth = torch.linalg.svd(w3.T @ p, full_matrices=False).U[:, :9]
    assert subspace_sin_theta(truth, sub.V.double()) < 1e-5
    assert float(sub.singular_values[9] / sub.singular_values[0]) < 1e-5
    assert sub.active_neurons(0.05) <= 9


def test_gradients_leave_batchnorm_statistics_alone(checkpoints_dir) -> None:
    loaded = load_model(checkpoints_dir / "vgg11_digits.safetensors")
    data = load_dataset("digits", input_shape=loaded.meta.input_shape, normalization=loaded.meta.normalization)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    loaded.model.train()  # even a model handed over in training mode must be differentiated in eval mode
    chain = ChainModel(loaded.model, loaded.meta.input_shape)
    cut = chain.cut(4)
    assert cut.features == 64 * 4 * 4  # conv4 + BN + ReLU + max-pool
    sub = active_subspace(chain, cut, data.train, SubspaceSettings(samples=64, sketch_size=16, batch_size=32), CPU)
    assert sub.n_samples == 64
    assert loaded.model.training  # restored
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, before[key]), key
