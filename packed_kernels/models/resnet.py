# SPDX-License-Identifier: Apache-2.0
"""Packed-Ensembles ResNets, module-for-module torch-uncertainty 0.13's packed_resnet (same
attribute names, so its state_dicts load, and the same parameter counts for every
configuration), built on packed_kernels.nn layers.

The ResNet layout (stem, stages, head) and its two blocks live here once, parametrised by a
layer family that builds the convolutions, norm widths and head: PackedLayers here, the
BatchEnsemble's in baselines.py. With packed_kernels.nn.BatchNorm2d as the norm layer, the
blocks run on the fused conv + BN path (nn.conv_bn.conv_bn_act): at inference each conv carries
its BN, residual and ReLU in its epilogue (a bottleneck block is three conv launches, plus the
projection shortcut's); in training the BN statistics come from the conv epilogues and BN + ReLU
is applied in the next conv's prologue, so only the block's last BN (+ shortcut + ReLU) is an
elementwise pass. Dropout between two convs materialises the activation only when it is active.

Outputs are estimator-major logits (M*B, num_classes) in training and in eval."""

from __future__ import annotations

from typing import Optional, Sequence, Type

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.packed import PackedConv2d
from ..nn.packed_linear import PackedLinear
from .._docs import with_arguments
from ._common import (BASIC_BLOCK_ARCHS, NARROW_ARCHS, check_style, conv_norm_act, default_norm,
                      dropout_between, fuses, make_norm, resnet_blocks, shortcut_forward)


class PackedLayers:
    """The layers of a PE-(alpha, M, gamma) ResNet: PackedConv2d (gamma-split where
    torch-uncertainty splits), norms over int(planes * alpha) channels, a PackedLinear head."""

    def __init__(self, alpha: float, num_estimators: int, gamma: int, groups: int, conv_bias: bool,
                 linear_implementation: str = "conv1d") -> None:
        self.alpha, self.num_estimators, self.gamma, self.groups = alpha, num_estimators, gamma, groups
        self.conv_bias, self.linear_implementation = conv_bias, linear_implementation

    def width(self, planes: int) -> int:
        return int(planes * self.alpha)

    def conv(self, in_planes: int, planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
             split: bool = True) -> nn.Module:
        return PackedConv2d(in_planes, planes, kernel_size, stride=stride, padding=padding,
                            alpha=self.alpha, num_estimators=self.num_estimators,
                            gamma=self.gamma if split else 1, groups=self.groups, bias=self.conv_bias)

    def shortcut_conv(self, in_planes: int, planes: int, stride: int, bottleneck: bool) -> nn.Module:
        return self.conv(in_planes, planes, 1, stride=stride)

    def stem_conv(self, in_channels: int, planes: int, **geometry) -> nn.Module:
        return PackedConv2d(in_channels, planes, alpha=self.alpha, num_estimators=self.num_estimators,
                            gamma=1, groups=self.groups, bias=self.conv_bias, first=True, **geometry)

    def head(self, features: int, num_classes: int) -> nn.Module:
        return PackedLinear(features, num_classes, alpha=self.alpha, num_estimators=self.num_estimators,
                            last=True, implementation=self.linear_implementation)


def _shortcut(layers, in_planes: int, planes: int, stride: int, norm: Type[nn.Module],
              bottleneck: bool) -> nn.Sequential:
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return nn.Sequential(layers.shortcut_conv(in_planes, planes, stride, bottleneck),
                         norm(layers.width(planes)))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> dropout -> conv3x3 -> BN -> + shortcut -> ReLU."""

    expansion = 1

    def __init__(self, layers, in_planes: int, planes: int, stride: int, dropout_rate: float,
                 normalization_layer: Type[nn.Module]) -> None:
        super().__init__()
        norm = normalization_layer
        self.conv1 = layers.conv(in_planes, planes, 3, stride=stride, padding=1, split=False)
        self.fused = fuses(norm)  # see conv_norm_act; ReLU commutes with dropout (>= 0 scaling)
        self.bn1 = make_norm(norm, layers.width(planes), relu=True)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv2 = layers.conv(planes, planes, 3, padding=1)
        self.bn2 = make_norm(norm, layers.width(planes), relu=True)
        self.shortcut = _shortcut(layers, in_planes, self.expansion * planes, stride, norm, False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            out = F.relu(self.dropout(self.bn1(self.conv1(x))))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))
        out = dropout_between(self.dropout, conv_norm_act(x, self.conv1, self.bn1, True, defer=True))
        return conv_norm_act(out, self.conv2, self.bn2, True,
                             residual=shortcut_forward(self.shortcut, x, True))


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> dropout -> conv1x1 -> BN -> + shortcut
    -> ReLU."""

    expansion = 4

    def __init__(self, layers, in_planes: int, planes: int, stride: int, dropout_rate: float,
                 normalization_layer: Type[nn.Module]) -> None:
        super().__init__()
        norm = normalization_layer
        self.fused = fuses(norm)
        self.conv1 = layers.conv(in_planes, planes, 1, split=False)  # no gamma split here
        self.bn1 = make_norm(norm, layers.width(planes), relu=True)
        self.conv2 = layers.conv(planes, planes, 3, stride=stride, padding=1)
        self.bn2 = make_norm(norm, layers.width(planes), relu=True)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv3 = layers.conv(planes, self.expansion * planes, 1)
        self.bn3 = make_norm(norm, layers.width(self.expansion * planes), relu=True)
        self.shortcut = _shortcut(layers, in_planes, self.expansion * planes, stride, norm, True)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.dropout(self.bn2(self.conv2(out))))
            out = self.bn3(self.conv3(out))
            return F.relu(out + self.shortcut(x))
        out = conv_norm_act(x, self.conv1, self.bn1, True, defer=True)
        out = dropout_between(self.dropout, conv_norm_act(out, self.conv2, self.bn2, True, defer=True))
        return conv_norm_act(out, self.conv3, self.bn3, True,
                             residual=shortcut_forward(self.shortcut, x, True))


class ResNetLayout(nn.Module):
    """The ResNet layout: conv1 -> bn1 -> ReLU -> max-pool ("imagenet" style) -> 3 or 4 stages of
    blocks (planes x1, x2, x4, x8; stride 1, 2, 2, 2) -> dropout -> average pool -> linear.
    Subclasses call _build_layout with their layer family (see PackedLayers)."""

    def _build_layout(self, layers, block, num_blocks: Sequence[int], in_channels: int,
                      num_classes: int, in_planes: int, style, norm: Type[nn.Module],
                      dropout_rate: float) -> None:
        style = check_style(style)
        self.in_planes = in_planes
        stem = dict(kernel_size=7, stride=2, padding=3) if style == "imagenet" else \
            dict(kernel_size=3, stride=1, padding=1)
        self.conv1 = layers.stem_conv(in_channels, in_planes, **stem)
        self.stem_fused = fuses(norm)  # BN + ReLU fused (see conv_norm_act)
        self.bn1 = make_norm(norm, layers.width(in_planes), relu=True)
        self.optional_pool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                              if style == "imagenet" else nn.Identity())
        common = dict(dropout_rate=dropout_rate, normalization_layer=norm)
        base = in_planes
        self.layer1 = self._make_layer(layers, block, base, num_blocks[0], 1, common)
        self.layer2 = self._make_layer(layers, block, base * 2, num_blocks[1], 2, common)
        self.layer3 = self._make_layer(layers, block, base * 4, num_blocks[2], 2, common)
        if len(num_blocks) == 4:
            self.layer4 = self._make_layer(layers, block, base * 8, num_blocks[3], 2, common)
            widest = base * 8
        else:
            self.layer4 = nn.Identity()
            widest = base * 4
        self.final_dropout = nn.Dropout(p=dropout_rate)
        self.pool = nn.AdaptiveAvgPool2d(output_size=1)
        self.flatten = nn.Flatten(1)
        self.linear = layers.head(widest * block.expansion, num_classes)

    def _make_layer(self, layers, block, planes: int, num_blocks: int, stride: int,
                    common) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(block(layers, in_planes=self.in_planes, planes=planes, stride=s, **common))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def feats_forward(self, x: Tensor) -> Tensor:
        out = self.optional_pool(conv_norm_act(x, self.conv1, self.bn1, self.stem_fused))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.final_dropout(self.flatten(self.pool(out)))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.feats_forward(x))


# torch-uncertainty's names for the blocks
_BasicBlock, _Bottleneck = BasicBlock, Bottleneck


@with_arguments
class PackedResNet(ResNetLayout):
    """A Packed-Ensembles ResNet from its blocks (packed_resnet builds one from `arch`): input
    (B, in_channels, H, W), output estimator-major logits (M*B, num_classes)."""

    def __init__(self, block, num_blocks, in_channels: int, num_classes: int, conv_bias: bool,
                 num_estimators: int, dropout_rate: float, alpha: float = 2.0, gamma: int = 1,
                 groups: int = 1, style: str = "imagenet", in_planes: int = 64,
                 normalization_layer: Optional[Type[nn.Module]] = None,
                 linear_implementation: str = "conv1d") -> None:
        super().__init__()
        self.in_channels, self.alpha, self.gamma, self.groups = in_channels, alpha, gamma, groups
        self.num_estimators = num_estimators
        layers = PackedLayers(alpha, num_estimators, gamma, groups, conv_bias, linear_implementation)
        self._build_layout(layers, block, num_blocks, in_channels, num_classes, in_planes, style,
                           normalization_layer or default_norm(), dropout_rate)


@with_arguments
def packed_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int, alpha: float,
                  gamma: int, conv_bias: bool = False, width_multiplier: float = 1.0, groups: int = 1,
                  dropout_rate: float = 0.0, style: str = "imagenet",
                  normalization_layer: Optional[Type[nn.Module]] = None,
                  linear_implementation: str = "conv1d") -> PackedResNet:
    """PE-(alpha, num_estimators, gamma) ResNet-`arch` (18, 20, 34, 44, 50, 56, 101, 110, 152),
    with torch-uncertainty's arguments and defaults. Input (B, in_channels, H, W); output
    (M*B, num_classes) logits, estimator-major, in the input's dtype."""
    num_blocks = resnet_blocks(arch)
    block = _BasicBlock if arch in BASIC_BLOCK_ARCHS else _Bottleneck
    in_planes = 16 if arch in NARROW_ARCHS else 64
    return PackedResNet(block, num_blocks, in_channels, num_classes, conv_bias, num_estimators,
                        dropout_rate, alpha=alpha, gamma=gamma, groups=groups, style=style,
                        in_planes=int(in_planes * width_multiplier),
                        normalization_layer=normalization_layer,
                        linear_implementation=linear_implementation)
