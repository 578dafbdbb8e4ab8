"""The model zoo: LeNets, CIFAR-style VGG and ResNet, torchvision ImageNet models, MLPs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from odekit.models.registry import register_arch

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (choose from {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


@register_arch("mlp", "plain nn.Sequential MLP: Flatten, [Linear, act]*, Linear", None)
def mlp(
    in_features: int,
    hidden: Sequence[int] = (300, 100),
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_arch("lenet300", "LeNet-300-100 (LeCun et al. 1998), 28x28 inputs", (1, 28, 28))
def lenet300(num_classes: int = 10, in_features: int = 784) -> nn.Module:
    return mlp(in_features, (300, 100), num_classes, "relu")


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling, padded first conv for 28x28 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = ((image_size // 2) - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_arch("lenet5", "LeNet-5 (conv 6-16, fc 120-84), 28x28 inputs", (1, 28, 28))
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    return LeNet5(num_classes, in_channels, image_size)


VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ],
}  # fmt: skip


class CifarVGG(nn.Module):
    """CIFAR-style VGG: 3x3 convs (optionally BN), five max-pools, one linear classifier."""

    def __init__(
        self,
        depth: str,
        num_classes: int = 10,
        batch_norm: bool = True,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, round(int(item) * width))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        side = image_size // 32
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for five 2x2 max-pools")
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _register_vgg(depth: str) -> None:
    for bn in (False, True):
        name = f"{depth}_bn" if bn else depth

        def builder(
            num_classes: int = 10,
            width: float = 1.0,
            in_channels: int = 3,
            image_size: int = 32,
            _depth: str = depth,
            _bn: bool = bn,
        ) -> CifarVGG:
            return CifarVGG(_depth, num_classes, _bn, width, in_channels, image_size)

        label = f"CIFAR-style {depth.upper()}{' with BatchNorm' if bn else ''} (width multiplier)"
        register_arch(name, label, (3, 32, 32))(builder)


for _depth in VGG_CONFIGS:
    _register_vgg(_depth)


class BasicBlock(nn.Module):
    """CIFAR ResNet block with the parameter-free 'option A' shortcut (He et al. 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n basic blocks (16, 32, 64 channels)."""

    def __init__(
        self, depth: int, num_classes: int = 10, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


def _register_resnet(depth: int) -> None:
    def builder(
        num_classes: int = 10, width: float = 1.0, in_channels: int = 3, _depth: int = depth
    ) -> CifarResNet:
        return CifarResNet(_depth, num_classes, width, in_channels)

    register_arch(f"resnet{depth}", f"CIFAR ResNet-{depth} (option A shortcuts)", (3, 32, 32))(
        builder
    )


for _d in (20, 32, 44, 56, 110):
    _register_resnet(_d)


TORCHVISION_MODELS = (
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
)  # fmt: skip


def _register_torchvision(name: str) -> None:
    def builder(num_classes: int = 1000, _name: str = name) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(_name, weights=None, num_classes=num_classes)

    register_arch(
        f"tv-{name}", f"torchvision ImageNet {name} (weights from your checkpoint)", (3, 224, 224)
    )(builder)


for _name in TORCHVISION_MODELS:
    _register_torchvision(_name)
