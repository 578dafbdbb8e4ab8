"""The lazy active-subspace line search makes the eager search's decisions with fewer passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odekit.methods.attacks import ActiveSubspaceAttack, ActiveSubspaceSettings
from odekit.methods.attacks.linesearch import _most_hits_not_above, line_search
from odekit.methods.attacks.predictions import predict_on
from odekit.methods.attacks.space import apply_perturbation


class _Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.samples = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += len(x)
        return self.model(x)


def test_threshold_matches_the_float_comparison() -> None:
    for n in (1, 7, 120, 360):
        for h in range(n + 1):
            ratio = h / n
            t = _most_hits_not_above(ratio, n)
            assert t / n <= ratio and (t + 1 > n or (t + 1) / n > ratio)
    assert _most_hits_not_above(float("nan"), 10) == 10 and _most_hits_not_above(0.5, 0) == 0


@pytest.mark.parametrize("target", [None, 3])
def test_lazy_search_decides_as_the_eager_one(target) -> None:
    torch.manual_seed(0)
    net = _Counting(nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10)).eval())
    x = torch.rand(150, 3, 4, 4)
    with torch.no_grad():
        clean = net(x).argmax(1)
    attack = ActiveSubspaceAttack(ActiveSubspaceSettings(delta=1.5, target=target))
    steps = [3.0 * 0.5**k for k in range(6)]
    eager_passes = lazy_passes = 0
    for trial in range(12):
        gen = torch.Generator().manual_seed(trial)
        v = attack.project(torch.randn(3, 4, 4, generator=gen), 1.5 * trial / 12)
        d = torch.randn(3, 4, 4, generator=gen)
        d = d / d.norm()
        ratio = attack.success_rate(net, x, v, clean, 64)
        pred = predict_on(net, apply_perturbation(x, v), 64)
        net.samples = 0
        want = attack._sharded_line_search(net, x, clean, v, d, ratio, steps, 1.5, 64)
        eager_passes, net.samples = eager_passes + net.samples, 0
        got = line_search(net, x, clean, v, pred, d, ratio, steps, lambda u: attack.project(u, 1.5), 64, target)
        lazy_passes += net.samples
        assert torch.equal(got[0], want[0]) and got[1] == want[1] and got[2] == want[2]
        assert torch.equal(got[3], predict_on(net, apply_perturbation(x, got[0]), 64))
    assert lazy_passes < eager_passes
