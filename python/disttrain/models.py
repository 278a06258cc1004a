"""Models by name, defined here so that nothing depends on torchvision.

ResNets follow He et al. (2016) with the CIFAR stem (3x3 conv, no max-pool)
for small images by default; ``stem="imagenet"`` gives torchvision's layout
(7x7 stride-2 conv and a max-pool: 16x less compute on 32x32 images, the same
parameters but for the first conv). ``vit_base_patch32_224`` is the Vision
Transformer of Dosovitskiy et al. (2021) with timm's/torchvision's layout
(patch 32, 12 layers, width 768); ``vit_small`` is the same code, small enough
for the embedded digits. ``small_cnn`` and ``mlp`` are quick models for tests
and notebooks.
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


class _EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: non-overlapping patches embedded by a strided conv, a
    class token, learned position embeddings, ``depth`` pre-norm blocks and a
    linear head on the class token. Each block is an ``_EncoderBlock``, the
    natural FSDP unit (``auto_wrap={VisionTransformer.block_class}``)."""

    block_class = _EncoderBlock

    def __init__(self, image_size: int = 224, patch_size: int = 32, depth: int = 12, width: int = 768,
                 heads: int = 12, mlp_dim: int = 3072, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"VisionTransformer: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"VisionTransformer: width {width} is not a multiple of heads {heads}")
        self.image_size = image_size
        self.conv_proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        patches = (image_size // patch_size) ** 2
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.empty(1, patches + 1, width).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[_EncoderBlock(width, heads, mlp_dim, dropout) for _ in range(depth)])
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"VisionTransformer: expects {self.image_size}x{self.image_size} images, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (batch, patches, width)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(self.dropout(x + self.pos_embedding))
        return self.head(self.ln(x[:, 0]))


def vit_base_patch32_224(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> VisionTransformer:
    """ViT-B/32: patch 32, 12 layers, width 768, 12 heads, MLP 3072 (88.2 M parameters at 1000 classes)."""
    return VisionTransformer(image_size, 32, 12, 768, 12, 3072, num_classes, in_channels)


def vit_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, patch_size: int = 2,
              depth: int = 4, width: int = 64, heads: int = 4) -> VisionTransformer:
    """The same code, small: patch 2 on 8x8 images (the embedded digits), 4 layers, width 64 by default."""
    return VisionTransformer(image_size, patch_size, depth, width, heads, 4 * width, num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
    "small_cnn": small_cnn, "mlp": mlp, "vit_base_patch32_224": vit_base_patch32_224, "vit_small": vit_small,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds a model by name (``resnet18`` ... ``resnet101``, ``small_cnn``, ``mlp``,
    ``vit_base_patch32_224``, ``vit_small``)."""
    try:
        factory = MODELS[name.lower() if isinstance(name, str) else name]
    except (KeyError, TypeError):  # TypeError: a name that is not hashable
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODELS)}") from None
    return factory(**kwargs)
