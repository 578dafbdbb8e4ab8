"""Reference dynamics for checking gradient methods on your own machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DissipativeConvField(nn.Module):
    """dz/dt = -W^T tanh(W z + b) with W a random 3x3 convolution (thesis fig. 2.1).

    The flow contracts feature maps, so solving it backward in time from z(t1), which the
    reverse dynamic ("adjoint") method does to recover z(t), amplifies every rounding and
    truncation error: rdm's gradients are wrong here while irdm's stay accurate. `gain`
    scales W and with it the contraction.
    """

    def __init__(self, channels: int = 4, gain: float = 3.0) -> None:
        super().__init__()
        scale = gain / (3 * channels**0.5)
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * scale)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        hidden = torch.tanh(F.conv2d(z, self.weight, self.bias, padding=1))
        return -F.conv_transpose2d(hidden, self.weight, padding=1)
