"""recalibrate_batchnorm restores statistics that were reset, and leaves other modes alone."""

import torch
from torch import nn

from odekit.methods.batchnorm import recalibrate_batchnorm


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))


def test_recalibration_gives_exact_batch_statistics() -> None:
    torch.manual_seed(0)
    net = _net().eval()
    x = torch.randn(50, 1, 6, 6) * 3 + 1
    n = recalibrate_batchnorm(net, x, batch_size=7)
    assert n == 1
    z = net[0](x)
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, z.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    # PyTorch keeps the unbiased variance per batch; the cumulative average of those is close
    assert torch.allclose(bn.running_var, z.var(dim=(0, 2, 3)), rtol=0.05)
    assert not any(m.training for m in net.modules())
    assert bn.momentum == 0.1


def test_recalibration_restores_reset_statistics() -> None:
    torch.manual_seed(1)
    net = _net()
    x = torch.randn(64, 1, 6, 6) * 2 + 0.5
    recalibrate_batchnorm(net, x)
    net.eval()
    reference = net(x)
    net[1].reset_running_stats()
    assert not torch.allclose(net(x), reference)
    recalibrate_batchnorm(net, x)
    torch.testing.assert_close(net(x), reference)
