# SPDX-License-Identifier: Apache-2.0
"""Masksembles ResNets (Durasov et al., CVPR 2021), module-for-module torch-uncertainty 0.13's
masked_resnet: same attribute names (its state_dicts load with strict=True), mask generation,
parameter counts and, for the same masks, outputs.

Every block convolution and the head see their input through M fixed binary channel masks
(packed_kernels.nn.MaskedConv2d / MaskedLinear); the stem is a plain convolution. The
convolutions run on packed_kernels.grouped_conv2d (GroupedConv2d)."""

from __future__ import annotations

from typing import Optional, Type

import numpy as np
from einops import repeat
from torch import Tensor, nn

from ..nn.masksembles import MaskedConv2d, MaskedLinear
from ..nn.packed import GroupedConv2d
from ._common import BASIC_BLOCK_ARCHS, NARROW_ARCHS, default_norm, resnet_blocks
from .._docs import with_arguments
from .resnet import BasicBlock, Bottleneck, ResNetLayout

REPEAT_STRATEGIES = ("legacy", "paper")


class MaskedLayers:
    """The layers of a Masksembles ResNet: MaskedConv2d everywhere but the stem (a plain conv),
    norms over `planes` channels, a MaskedLinear head. One numpy generator draws every layer's
    masks, so a seed makes a model's masks reproducible."""

    def __init__(self, num_estimators: int, scale: float, groups: int, conv_bias: bool,
                 rng: np.random.Generator) -> None:
        self.num_estimators, self.scale, self.groups, self.conv_bias = num_estimators, scale, groups, conv_bias
        self.rng = rng

    def width(self, planes: int) -> int:
        return planes

    def conv(self, in_planes: int, planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
             split: bool = True) -> nn.Module:
        return MaskedConv2d(in_planes, planes, kernel_size, self.num_estimators, self.scale,
                            stride=stride, padding=padding, groups=self.groups, bias=self.conv_bias,
                            rng=self.rng)

    def shortcut_conv(self, in_planes: int, planes: int, stride: int, bottleneck: bool) -> nn.Module:
        return self.conv(in_planes, planes, 1, stride=stride)

    def stem_conv(self, in_channels: int, planes: int, **geometry) -> nn.Module:
        return GroupedConv2d(in_channels, planes, groups=self.groups, bias=False, **geometry)

    def head(self, features: int, num_classes: int) -> nn.Module:
        return MaskedLinear(features, num_classes, self.num_estimators, scale=self.scale, rng=self.rng)


@with_arguments
class MasksemblesResNet(ResNetLayout):
    """Input (B, C, H, W). In eval, and in training with repeat_strategy "legacy", the input is
    repeated M times and the output is estimator-major (M*B, classes). In training with
    "paper" (the Masksembles paper's), the batch is not repeated: its M consecutive blocks of
    B/M rows go to the M members, and the output is (B, classes) in the same order."""

    def __init__(self, in_channels: int, num_classes: int, arch: int, num_estimators: int,
                 scale: float = 2.0, conv_bias: bool = True, dropout_rate: float = 0.0,
                 width_multiplier: float = 1.0, groups: int = 1, style: str = "imagenet",
                 normalization_layer: Optional[Type[nn.Module]] = None,
                 repeat_strategy: str = "paper", seed: Optional[int] = None) -> None:
        if repeat_strategy not in REPEAT_STRATEGIES:
            raise ValueError(f"repeat_strategy must be one of {REPEAT_STRATEGIES}, got {repeat_strategy!r}")
        super().__init__()
        num_blocks = resnet_blocks(arch)
        block = BasicBlock if arch in BASIC_BLOCK_ARCHS else Bottleneck
        self.in_channels = in_channels
        self.num_estimators = num_estimators
        self.repeat_strategy = repeat_strategy
        layers = MaskedLayers(num_estimators, scale, groups, conv_bias, np.random.default_rng(seed))
        self._build_layout(layers, block, num_blocks, in_channels, num_classes,
                           int((16 if arch in NARROW_ARCHS else 64) * width_multiplier), style,
                           normalization_layer or default_norm(), dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.repeat_strategy == "legacy":
            x = repeat(x, "b ... -> (m b) ...", m=self.num_estimators)
        return super().forward(x)


@with_arguments
def masksembles_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int = 4,
                       scale: float = 2.0, width_multiplier: float = 1.0, groups: int = 1,
                       conv_bias: bool = True, dropout_rate: float = 0.0, style: str = "imagenet",
                       normalization_layer: Optional[Type[nn.Module]] = None,
                       repeat_strategy: str = "paper", seed: Optional[int] = None) -> MasksemblesResNet:
    """Masksembles ResNet-`arch` with torch-uncertainty's masked_resnet arguments (M = 4 and
    scale 2, the Packed-Ensembles paper's configuration, by default). `seed` draws the masks
    reproducibly (None: fresh ones, as upstream)."""
    return MasksemblesResNet(in_channels, num_classes, arch, num_estimators, scale=scale,
                             conv_bias=conv_bias, dropout_rate=dropout_rate,
                             width_multiplier=width_multiplier, groups=groups, style=style,
                             normalization_layer=normalization_layer,
                             repeat_strategy=repeat_strategy, seed=seed)
