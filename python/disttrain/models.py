"""Models by name, defined here so that nothing depends on torchvision.

ResNets follow He et al. (2016) with the CIFAR stem (3x3 conv, no max-pool)
for small images by default; ``stem="imagenet"`` gives torchvision's layout
(7x7 stride-2 conv and a max-pool: 16x less compute on 32x32 images, the same
parameters but for the first conv). ``small_cnn`` and ``mlp`` are quick models
for tests and notebooks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
    def __init__(self, block, num_blocks: list[int], num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 stem: str = "cifar"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; choose one of {', '.join(STEMS)}")
        self.in_planes = width
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.pool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2)
        self.linear = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.pool(torch.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, stem=stem)


def resnet34(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, stem=stem)


def resnet50(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, stem=stem)


def resnet101(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, in_channels, stem=stem)


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Two conv layers and a linear head; works for any image of at least 8x8."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, num_classes))


def mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 256, depth: int = 2) -> nn.Module:
    """Fully connected net on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
    "small_cnn": small_cnn, "mlp": mlp,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds a model by name (``resnet18`` ... ``resnet101``, ``small_cnn``, ``mlp``)."""
    try:
        factory = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODELS)}") from None
    return factory(**kwargs)
