"""Models written the way users write them, not the way odekit's zoo does.

Each definition is plain PyTorch that odekit did not make: a kuangliu-style CIFAR VGG (biased
convs, BatchNorm, ``out.view(out.size(0), -1)`` in forward), torchvision's ResNet-18 and an MLP
that applies its activations functionally; and modern blocks at small widths: a torchvision
ViT with a custom configuration, a ConvNeXt-style network (depthwise 7x7, LayerNorm, GELU MLP,
layer scale) and a MobileNet/EfficientNet-style inverted residual network (SiLU,
squeeze-excitation). The tests load this file as a user's own module
(``--arch tests/foreign/zoo.py:KuangliuVGG``) and copy it under another name to play a user's
``myvgg.py``; keep it free of odekit and test imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VGG_CFG = {
    "VGG11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class KuangliuVGG(nn.Module):
    """CIFAR VGG as in kuangliu/pytorch-cifar, with channel counts divided by ``width_div``."""

    def __init__(self, vgg_name: str = "VGG19", num_classes: int = 10, width_div: int = 1) -> None:
        super().__init__()
        cfg = [c if c == "M" else max(1, int(c) // width_div) for c in VGG_CFG[vgg_name]]
        self.features = self._make_layers(cfg)
        self.classifier = nn.Linear(int(cfg[-2]), num_classes)

    def forward(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        out = self.classifier(out)
        return out

    def _make_layers(self, cfg):
        layers: list[nn.Module] = []
        in_channels = 3
        for x in cfg:
            if x == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                layers += [nn.Conv2d(in_channels, x, kernel_size=3, padding=1), nn.BatchNorm2d(x), nn.ReLU(inplace=True)]
                in_channels = x
        layers += [nn.AvgPool2d(kernel_size=1, stride=1)]
        return nn.Sequential(*layers)


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (random init), a factory as users often write them."""
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(num_classes=num_classes)


class FunctionalMLP(nn.Module):
    """An MLP whose activations are ``F.relu`` calls in forward, not modules."""

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def vit(**kwargs) -> nn.Module:
    """torchvision's VisionTransformer with a custom configuration (class token, fused in_proj)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(**kwargs)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's stem and downsampling norm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, pointwise GELU MLP (Linear on channels-last), layer scale, residual."""

    def __init__(self, dim: int, scale: float = 1e-1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(scale * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    """A ConvNeXt-style network: patchify stem, ``depth`` blocks, global pool, LayerNorm, head."""

    def __init__(self, dim: int = 16, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, kernel_size=2, stride=2), LayerNorm2d(dim, eps=1e-6))
        self.stages = nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean(dim=(-2, -1))))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2/EfficientNet block: 1x1 expand, depthwise 3x3, squeeze-excitation, 1x1 project, SiLU."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()
        )
        self.se = SqueezeExcite(hidden, max(1, channels // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class MBNet(nn.Module):
    """Stem conv, ``depth`` inverted residual blocks with SE, 1x1 head conv, pool, classifier."""

    def __init__(self, channels: int = 8, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels), nn.SiLU())
        self.blocks = nn.Sequential(*(InvertedResidual(channels) for _ in range(depth)))
        self.head = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * channels, num_classes)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))))
