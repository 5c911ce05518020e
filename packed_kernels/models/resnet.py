"""Packed-Ensembles ResNets, module-for-module torch-uncertainty 0.13's packed_resnet (same
attribute names, so its state_dicts load, and the same parameter counts for every
configuration), built on packed_kernels.nn layers.

Outputs are estimator-major logits (M*B, num_classes) in training and in eval."""

from __future__ import annotations

from typing import Optional, Type

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.packed import PackedConv2d, PackedLinear
from ._common import (BASIC_BLOCK_ARCHS, NARROW_ARCHS, check_style, default_norm, fuses,
                      make_norm, resnet_blocks)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, alpha: float, num_estimators: int,
                 gamma: int, conv_bias: bool, dropout_rate: float, groups: int,
                 normalization_layer: Type[nn.Module]) -> None:
        super().__init__()
        packed = dict(alpha=alpha, num_estimators=num_estimators, groups=groups, bias=conv_bias)
        self.conv1 = PackedConv2d(in_planes, planes, 3, stride=stride, padding=1, **packed)  # gamma 1
        # With packed_kernels' BatchNorm2d, BN + ReLU (bn1) and BN + residual + ReLU (bn2) run as
        # one kernel each; ReLU commutes with dropout (a non-negative scaling), so order is free.
        self.fused = fuses(normalization_layer)
        self.bn1 = make_norm(normalization_layer, int(planes * alpha), relu=True)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv2 = PackedConv2d(planes, planes, 3, padding=1, gamma=gamma, **packed)
        self.bn2 = make_norm(normalization_layer, int(planes * alpha), relu=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                PackedConv2d(in_planes, self.expansion * planes, 1, stride=stride, gamma=gamma, **packed),
                normalization_layer(int(self.expansion * planes * alpha)))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            out = self.dropout(self.bn1(self.conv1(x)))
            return self.bn2(self.conv2(out), residual=self.shortcut(x))
        out = F.relu(self.dropout(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, alpha: float, num_estimators: int,
                 gamma: int, conv_bias: bool, dropout_rate: float, groups: int,
                 normalization_layer: Type[nn.Module]) -> None:
        super().__init__()
        packed = dict(alpha=alpha, num_estimators=num_estimators, groups=groups, bias=conv_bias)
        self.fused = fuses(normalization_layer)  # as in _BasicBlock: BN (+ residual) + ReLU
        width, wide = int(planes * alpha), int(self.expansion * planes * alpha)
        self.conv1 = PackedConv2d(in_planes, planes, 1, gamma=1, **packed)  # no gamma split here
        self.bn1 = make_norm(normalization_layer, width, relu=True)
        self.conv2 = PackedConv2d(planes, planes, 3, stride=stride, padding=1, gamma=gamma, **packed)
        self.bn2 = make_norm(normalization_layer, width, relu=True)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv3 = PackedConv2d(planes, self.expansion * planes, 1, gamma=gamma, **packed)
        self.bn3 = make_norm(normalization_layer, wide, relu=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                PackedConv2d(in_planes, self.expansion * planes, 1, stride=stride, gamma=gamma, **packed),
                normalization_layer(int(self.expansion * planes * alpha)))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            out = self.dropout(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
            return self.bn3(self.conv3(out), residual=self.shortcut(x))
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.dropout(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class PackedResNet(nn.Module):
    def __init__(self, block, num_blocks, in_channels: int, num_classes: int, conv_bias: bool,
                 num_estimators: int, dropout_rate: float, alpha: float = 2.0, gamma: int = 1,
                 groups: int = 1, style: str = "imagenet", in_planes: int = 64,
                 normalization_layer: Optional[Type[nn.Module]] = None,
                 linear_implementation: str = "conv1d") -> None:
        super().__init__()
        style = check_style(style)
        norm = normalization_layer or default_norm()
        self.in_channels, self.alpha, self.gamma, self.groups = in_channels, alpha, gamma, groups
        self.num_estimators = num_estimators
        self.in_planes = in_planes
        stem = dict(kernel_size=7, stride=2, padding=3) if style == "imagenet" else \
            dict(kernel_size=3, stride=1, padding=1)
        self.conv1 = PackedConv2d(in_channels, in_planes, alpha=alpha, num_estimators=num_estimators,
                                  gamma=1, groups=groups, bias=conv_bias, first=True, **stem)
        self.stem_fused = fuses(norm)  # BN + ReLU in one pass
        self.bn1 = make_norm(norm, int(in_planes * alpha), relu=True)
        self.optional_pool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                              if style == "imagenet" else nn.Identity())
        common = dict(alpha=alpha, num_estimators=num_estimators, conv_bias=conv_bias,
                      dropout_rate=dropout_rate, gamma=gamma, groups=groups, normalization_layer=norm)
        base = in_planes
        self.layer1 = self._make_layer(block, base, num_blocks[0], 1, common)
        self.layer2 = self._make_layer(block, base * 2, num_blocks[1], 2, common)
        self.layer3 = self._make_layer(block, base * 4, num_blocks[2], 2, common)
        if len(num_blocks) == 4:
            self.layer4 = self._make_layer(block, base * 8, num_blocks[3], 2, common)
            widest = base * 8
        else:
            self.layer4 = nn.Identity()
            widest = base * 4
        self.final_dropout = nn.Dropout(p=dropout_rate)
        self.pool = nn.AdaptiveAvgPool2d(output_size=1)
        self.flatten = nn.Flatten(1)
        self.linear = PackedLinear(widest * block.expansion, num_classes, alpha=alpha,
                                   num_estimators=num_estimators, last=True,
                                   implementation=linear_implementation)

    def _make_layer(self, block, planes: int, num_blocks: int, stride: int, common) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(in_planes=self.in_planes, planes=planes, stride=s, **common))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def feats_forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.optional_pool(out if self.stem_fused else F.relu(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.final_dropout(self.flatten(self.pool(out)))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.feats_forward(x))


def packed_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int, alpha: float,
                  gamma: int, conv_bias: bool = False, width_multiplier: float = 1.0, groups: int = 1,
                  dropout_rate: float = 0.0, style: str = "imagenet",
                  normalization_layer: Optional[Type[nn.Module]] = None,
                  linear_implementation: str = "conv1d") -> PackedResNet:
    """PE-(alpha, num_estimators, gamma) ResNet-`arch` (18, 20, 34, 44, 50, 56, 101, 110, 152),
    with torch-uncertainty's arguments and defaults. style: "imagenet" (7x7 stem + max-pool) or
    "cifar" (3x3 stem). normalization_layer defaults to packed_kernels.nn.BatchNorm2d where it
    exists, else nn.BatchNorm2d. Input (B, in_channels, H, W); output (M*B, num_classes)."""
    num_blocks = resnet_blocks(arch)
    block = _BasicBlock if arch in BASIC_BLOCK_ARCHS else _Bottleneck
    in_planes = 16 if arch in NARROW_ARCHS else 64
    return PackedResNet(block, num_blocks, in_channels, num_classes, conv_bias, num_estimators,
                        dropout_rate, alpha=alpha, gamma=gamma, groups=groups, style=style,
                        in_planes=int(in_planes * width_multiplier),
                        normalization_layer=normalization_layer,
                        linear_implementation=linear_implementation)
