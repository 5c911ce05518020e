# SPDX-License-Identifier: Apache-2.0
"""Packed-Ensembles Wide-ResNet-28x10, module-for-module torch-uncertainty 0.13's
packed_wideresnet28x10 (same attribute names and parameter counts). Outputs (M*B, classes)."""

from __future__ import annotations

from typing import Callable, Optional, Type

from torch import Tensor, nn
from torch.nn.functional import relu

from ..nn.conv_bn import conv_bn_act
from ..nn.packed import PackedConv2d
from ..nn.packed_linear import PackedLinear
from .._docs import with_arguments
from ._common import check_style, conv_norm_act, default_norm, dropout_active, fuses, make_norm


class _WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, conv_bias: bool, dropout_rate: float, stride: int,
                 alpha: float, num_estimators: int, gamma: int, groups: int,
                 activation_fn: Callable, normalization_layer: Type[nn.Module]) -> None:
        super().__init__()
        self.activation_fn = activation_fn
        # packed_kernels' BatchNorm2d: the fused conv + BN path (nn.conv_bn.conv_bn_act) and
        # ReLU in the BN pass
        self.fused = fuses(normalization_layer) and activation_fn is relu
        norm = (lambda c: make_norm(normalization_layer, c, relu=True)) if self.fused else normalization_layer
        packed = dict(alpha=alpha, num_estimators=num_estimators, gamma=gamma, groups=groups,
                      bias=conv_bias)
        self.conv1 = PackedConv2d(in_planes, planes, 3, padding=1, **packed)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.bn1 = norm(int(alpha * planes))
        self.conv2 = PackedConv2d(planes, planes, 3, stride=stride, padding=1, **packed)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(PackedConv2d(in_planes, planes, 1, stride=stride, **packed))
        self.bn2 = norm(int(alpha * planes))

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            out = self.activation_fn(self.bn1(self.dropout(self.conv1(x))))
            out = self.conv2(out) + self.shortcut(x)
            return self.activation_fn(self.bn2(out))
        if dropout_active(self.dropout):  # dropout before bn1: its statistics are after it
            out = self.bn1(self.dropout(self.conv1(x)))
        else:  # bn1 + ReLU from conv1's epilogue: folded (eval) or into conv2's prologue
            out = conv_bn_act(x, self.conv1, self.bn1, defer=True)
        # the shortcut joins before bn2: conv2's epilogue adds it, then one BN + ReLU pass
        out = conv_bn_act(out, self.conv2, None, residual=self.shortcut(x), activation=None)
        return self.bn2(out)


@with_arguments
class PackedWideResNet(nn.Module):
    """A Packed-Ensembles Wide-ResNet-depth-widen_factor (torch-uncertainty's packed_wideresnet):
    input (B, in_channels, H, W), output estimator-major logits (M*B, num_classes)."""

    def __init__(self, depth: int, widen_factor: int, in_channels: int, num_classes: int,
                 conv_bias: bool, dropout_rate: float, num_estimators: int, alpha: float = 2.0,
                 gamma: int = 1, groups: int = 1, style: str = "imagenet",
                 activation_fn: Callable = relu,
                 normalization_layer: Optional[Type[nn.Module]] = None) -> None:
        super().__init__()
        style = check_style(style)
        if (depth - 4) % 6:
            raise ValueError(f"Wide-ResNet depth must be 6n+4, got {depth}")
        norm = normalization_layer or default_norm()
        self.num_estimators = num_estimators
        self.activation_fn = activation_fn
        self.in_planes = 16
        num_blocks = (depth - 4) // 6
        stages = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if style == "imagenet":  # torch-uncertainty: gamma 1 in the ImageNet stem, gamma in CIFAR's
            stem = dict(kernel_size=7, stride=2, padding=3, gamma=1)
        else:
            stem = dict(kernel_size=3, stride=1, padding=1, gamma=gamma)
        self.conv1 = PackedConv2d(in_channels, stages[0], alpha=alpha, num_estimators=num_estimators,
                                  groups=groups, bias=conv_bias, first=True, **stem)
        self.stem_fused = fuses(norm) and activation_fn is relu
        self.bn1 = make_norm(norm, int(stages[0] * alpha), relu=True) if self.stem_fused else norm(int(stages[0] * alpha))
        self.optional_pool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                              if style == "imagenet" else nn.Identity())
        common = dict(conv_bias=conv_bias, dropout_rate=dropout_rate, alpha=alpha,
                      num_estimators=num_estimators, gamma=gamma, groups=groups,
                      activation_fn=activation_fn, normalization_layer=norm)
        self.layer1 = self._wide_layer(stages[1], num_blocks, 1, common)
        self.layer2 = self._wide_layer(stages[2], num_blocks, 2, common)
        self.layer3 = self._wide_layer(stages[3], num_blocks, 2, common)
        self.final_dropout = nn.Dropout(p=dropout_rate)
        self.pool = nn.AdaptiveAvgPool2d(output_size=1)
        self.flatten = nn.Flatten(1)
        self.linear = PackedLinear(stages[3], num_classes, alpha=alpha, num_estimators=num_estimators,
                                   last=True)

    def _wide_layer(self, planes: int, num_blocks: int, stride: int, common) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_WideBasicBlock(in_planes=self.in_planes, planes=planes, stride=s, **common))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def feats_forward(self, x: Tensor) -> Tensor:
        out = conv_norm_act(x, self.conv1, self.bn1, self.stem_fused, activation_fn=self.activation_fn)
        out = self.optional_pool(out)
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.final_dropout(self.flatten(self.pool(out)))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.feats_forward(x))


@with_arguments
def packed_wideresnet28x10(in_channels: int, num_classes: int, num_estimators: int, alpha: float,
                           gamma: int, conv_bias: bool = True, dropout_rate: float = 0.3,
                           groups: int = 1, style: str = "imagenet", activation_fn: Callable = relu,
                           normalization_layer: Optional[Type[nn.Module]] = None) -> PackedWideResNet:
    """PE-(alpha, num_estimators, gamma) Wide-ResNet-28x10 with torch-uncertainty's defaults."""
    return PackedWideResNet(28, 10, in_channels, num_classes, conv_bias, dropout_rate,
                            num_estimators, alpha=alpha, gamma=gamma, groups=groups, style=style,
                            activation_fn=activation_fn, normalization_layer=normalization_layer)
