"""Models written the way users write them, not the way odekit's zoo does.

Each definition is plain PyTorch that odekit did not make: a kuangliu-style CIFAR VGG (biased
convs, BatchNorm, ``out.view(out.size(0), -1)`` in forward), torchvision's ResNet-18 and an MLP
that applies its activations functionally. The tests load this file as a user's own module
(``--arch tests/foreign/zoo.py:KuangliuVGG``) and copy it under another name to play a user's
``myvgg.py``; keep it free of odekit and test imports.
"""

from __future__ import annotations

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
