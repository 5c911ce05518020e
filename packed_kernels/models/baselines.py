"""Baselines for the speed table, on the same ops as the Packed-Ensembles (every convolution
runs through packed_kernels.grouped_conv2d). All return estimator-major logits
(M*B, num_classes) in training and in eval, so pk.ensemble_mean / ensemble_scores apply.

- resnet:               the single ResNet: packed_resnet with alpha=1, M=1, gamma=1, which is
                        exactly torch-uncertainty's standard ResNet (same parameter count).
- deep_ensemble_resnet: M independent ResNets run as ONE network whose convolutions are
                        block-diagonal with M groups: packed_resnet(alpha=M, M, gamma=1). Each
                        group is one member at full width, the dense stem equals M separate
                        stems on the shared input, batch norm is per channel. This is the
                        fastest way PyTorch offers to run M different networks on one batch
                        (one launch per layer instead of M; vmap over stacked weights lowers
                        to the same grouped convolutions, and cannot update BN running stats).
                        With the mean cross-entropy over all M*B rows each member's gradient
                        is 1/M of its gradient alone: scale an SGD learning rate by M to match
                        independent training (Adam is invariant to it).
- mimo_resnet:          MIMO (Havasi et al. 2021): one ResNet, M inputs stacked on channels,
                        M heads; torch-uncertainty's mimo_resnet.
- batched_resnet:       BatchEnsemble (Wen et al. 2020): shared weights with rank-1 fast
                        weights r (input side) and s (output side) and a bias per member;
                        torch-uncertainty's batched_resnet (inputs repeated M times in
                        training and eval, its "legacy" strategy, so outputs are (M*B, C)).
"""

from __future__ import annotations

import math
from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.packed import STOCK, GroupedConv2d, autocast_operands
from ..ops.conv import grouped_conv2d
from ._common import (BASIC_BLOCK_ARCHS, NARROW_ARCHS, check_style, default_norm, fuses,
                      make_norm, resnet_blocks)
from .resnet import PackedResNet, packed_resnet


def resnet(in_channels: int, num_classes: int, arch: int, conv_bias: bool = False,
           width_multiplier: float = 1.0, groups: int = 1, dropout_rate: float = 0.0,
           style: str = "imagenet", normalization_layer: Optional[Type[nn.Module]] = None) -> PackedResNet:
    """The single ResNet (output (B, num_classes): M = 1)."""
    return packed_resnet(in_channels, num_classes, arch, num_estimators=1, alpha=1, gamma=1,
                         conv_bias=conv_bias, width_multiplier=width_multiplier, groups=groups,
                         dropout_rate=dropout_rate, style=style,
                         normalization_layer=normalization_layer)


def deep_ensemble_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int,
                         conv_bias: bool = False, width_multiplier: float = 1.0,
                         dropout_rate: float = 0.0, style: str = "imagenet",
                         normalization_layer: Optional[Type[nn.Module]] = None) -> PackedResNet:
    """M independent ResNets as one block-diagonal network (see the module docstring)."""
    return packed_resnet(in_channels, num_classes, arch, num_estimators=num_estimators,
                         alpha=num_estimators, gamma=1, conv_bias=conv_bias,
                         width_multiplier=width_multiplier, dropout_rate=dropout_rate, style=style,
                         normalization_layer=normalization_layer)


class MIMOResNet(PackedResNet):
    """Training input: (M*B, C, H, W), M batches (estimator-major) that the M subnetworks see
    side by side; eval input: (B, C, H, W), shown to every subnetwork. Output (M*B, classes)."""

    def __init__(self, num_estimators: int, **kwargs) -> None:
        super().__init__(num_estimators=1, alpha=1, gamma=1, **kwargs)
        self.num_estimators = num_estimators

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_estimators
        if not self.training:
            x = x.repeat(m, *([1] * (x.dim() - 1)))
        if x.shape[0] % m:
            raise ValueError(f"MIMOResNet: training batch of {x.shape[0]} is not M={m} batches")
        b = x.shape[0] // m
        stacked = x.reshape(m, b, *x.shape[1:]).transpose(0, 1).reshape(b, m * x.shape[1], *x.shape[2:])
        out = super().forward(stacked)  # (B, M*classes)
        return out.reshape(b, m, -1).transpose(0, 1).reshape(m * b, -1)


def mimo_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int,
                conv_bias: bool = True, dropout_rate: float = 0.0, width_multiplier: float = 1.0,
                groups: int = 1, style: str = "imagenet",
                normalization_layer: Optional[Type[nn.Module]] = None) -> MIMOResNet:
    num_blocks = resnet_blocks(arch)
    from .resnet import _BasicBlock, _Bottleneck
    block = _BasicBlock if arch in BASIC_BLOCK_ARCHS else _Bottleneck
    in_planes = 16 if arch in NARROW_ARCHS else 64
    return MIMOResNet(num_estimators, block=block, num_blocks=num_blocks,
                      in_channels=in_channels * num_estimators,
                      num_classes=num_classes * num_estimators, conv_bias=conv_bias,
                      dropout_rate=dropout_rate, groups=groups, style=style,
                      in_planes=int(in_planes * width_multiplier),
                      normalization_layer=normalization_layer)


# ---------------------------------------------------------------------------------------------
# BatchEnsemble
# ---------------------------------------------------------------------------------------------

def _per_member(t: Tensor, num_estimators: int, layer: str) -> int:
    if t.shape[0] % num_estimators:
        raise ValueError(f"{layer}: batch of {t.shape[0]} is not divisible by num_estimators="
                         f"{num_estimators} (inputs are estimator-major: M blocks of B rows)")
    return t.shape[0] // num_estimators


class BatchConv2d(nn.Module):
    """BatchEnsemble conv: out_m = (W * (x_m . r_m)) . s_m + bias_m for member m; the inner
    `conv` holds the shared weight (torch-uncertainty's parameter names and shapes)."""

    routes_through_packed_ops = True  # packed_kernels.nn.set_backend applies
    backend: Optional[str] = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_estimators: int,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_estimators = num_estimators
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=False, **factory)
        self.r_group = nn.Parameter(torch.empty(num_estimators, in_channels, **factory))
        self.s_group = nn.Parameter(torch.empty(num_estimators, out_channels, **factory))
        self.bias = nn.Parameter(torch.empty(num_estimators, out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.r_group, mean=1.0, std=0.5)
        nn.init.normal_(self.s_group, mean=1.0, std=0.5)
        if self.bias is not None:
            fan_in = self.conv.weight[0].numel()
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_estimators
        b = _per_member(x, m, "BatchConv2d")
        x, weight, r, s, bias = autocast_operands(x, self.conv.weight, self.r_group, self.s_group, self.bias)
        scaled = (x.reshape(m, b, *x.shape[1:]) * r[:, None, :, None, None]).reshape(x.shape)
        if self.backend == STOCK:
            out = self.conv(scaled)
        else:
            out = grouped_conv2d(scaled, weight, None, self.conv.stride, self.conv.padding,
                                 self.conv.dilation, self.conv.groups, backend=self.backend)
        out = out.reshape(m, b, *out.shape[1:]) * s[:, None, :, None, None]
        if bias is not None:
            out = out + bias[:, None, :, None, None]
        return out.reshape(m * b, *out.shape[2:])


class BatchLinear(nn.Module):
    """BatchEnsemble linear layer (torch-uncertainty's parameter names and shapes)."""

    def __init__(self, in_features: int, out_features: int, num_estimators: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_estimators = num_estimators
        self.linear = nn.Linear(in_features, out_features, bias=False, **factory)
        self.r_group = nn.Parameter(torch.empty(num_estimators, in_features, **factory))
        self.s_group = nn.Parameter(torch.empty(num_estimators, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_estimators, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.r_group, mean=1.0, std=0.5)
        nn.init.normal_(self.s_group, mean=1.0, std=0.5)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.linear.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_estimators
        b = _per_member(x, m, "BatchLinear")
        rows = x.reshape(m, b, -1) * self.r_group[:, None, :]
        out = self.linear(rows) * self.s_group[:, None, :]
        if self.bias is not None:
            out = out + self.bias[:, None, :]
        return out.reshape(m * b, -1)


class _BatchBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride, num_estimators, conv_bias, dropout_rate, groups,
                 normalization_layer) -> None:
        super().__init__()
        self.fused = fuses(normalization_layer)  # BN (+ residual) + ReLU in one pass, as PE's
        self.conv1 = BatchConv2d(in_planes, planes, 3, num_estimators, stride=stride, padding=1,
                                 groups=groups, bias=conv_bias)
        self.bn1 = make_norm(normalization_layer, planes, relu=True)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv2 = BatchConv2d(planes, planes, 3, num_estimators, padding=1, groups=groups,
                                 bias=conv_bias)
        self.bn2 = make_norm(normalization_layer, planes, relu=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:  # a shared (not batched) projection, as upstream
            self.shortcut = nn.Sequential(
                GroupedConv2d(in_planes, planes, 1, stride=stride, groups=groups, bias=conv_bias),
                normalization_layer(planes))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return self.bn2(self.conv2(self.dropout(self.bn1(self.conv1(x)))), residual=self.shortcut(x))
        out = F.relu(self.dropout(self.bn1(self.conv1(x))))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _BatchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride, num_estimators, conv_bias, dropout_rate, groups,
                 normalization_layer) -> None:
        super().__init__()
        self.fused = fuses(normalization_layer)
        self.conv1 = BatchConv2d(in_planes, planes, 1, num_estimators, groups=groups, bias=conv_bias)
        self.bn1 = make_norm(normalization_layer, planes, relu=True)
        self.conv2 = BatchConv2d(planes, planes, 3, num_estimators, stride=stride, padding=1,
                                 groups=groups, bias=conv_bias)
        self.bn2 = make_norm(normalization_layer, planes, relu=True)
        self.dropout = nn.Dropout2d(p=dropout_rate)
        self.conv3 = BatchConv2d(planes, 4 * planes, 1, num_estimators, groups=groups, bias=conv_bias)
        self.bn3 = make_norm(normalization_layer, 4 * planes, relu=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(
                BatchConv2d(in_planes, 4 * planes, 1, num_estimators, stride=stride, groups=groups,
                            bias=conv_bias),
                normalization_layer(4 * planes))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            out = self.dropout(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
            return self.bn3(self.conv3(out), residual=self.shortcut(x))
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.dropout(self.bn2(self.conv2(out))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class BatchedResNet(nn.Module):
    """BatchEnsemble ResNet: input (B, C, H, W) is repeated M times; output (M*B, classes)."""

    def __init__(self, in_channels: int, num_classes: int, arch: int, num_estimators: int,
                 conv_bias: bool = True, dropout_rate: float = 0.0, width_multiplier: float = 1.0,
                 groups: int = 1, style: str = "imagenet",
                 normalization_layer: Optional[Type[nn.Module]] = None) -> None:
        super().__init__()
        style = check_style(style)
        norm = normalization_layer or default_norm()
        num_blocks = resnet_blocks(arch)
        block = _BatchBasicBlock if arch in BASIC_BLOCK_ARCHS else _BatchBottleneck
        base = int((16 if arch in NARROW_ARCHS else 64) * width_multiplier)
        self.num_estimators = num_estimators
        self.in_planes = base
        stem = dict(kernel_size=7, stride=2, padding=3) if style == "imagenet" else \
            dict(kernel_size=3, stride=1, padding=1)
        self.conv1 = BatchConv2d(in_channels, base, num_estimators=num_estimators, groups=groups,
                                 bias=False, **stem)
        self.stem_fused = fuses(norm)
        self.bn1 = make_norm(norm, base, relu=True)
        self.optional_pool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                              if style == "imagenet" else nn.Identity())
        common = dict(num_estimators=num_estimators, conv_bias=conv_bias, dropout_rate=dropout_rate,
                      groups=groups, normalization_layer=norm)
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
        self.linear = BatchLinear(widest * block.expansion, num_classes, num_estimators)

    def _make_layer(self, block, planes, num_blocks, stride, common) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, **common))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = x.repeat(self.num_estimators, *([1] * (x.dim() - 1)))
        out = self.bn1(self.conv1(x))
        out = self.optional_pool(out if self.stem_fused else F.relu(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.final_dropout(self.flatten(self.pool(out))))


def batched_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int,
                   conv_bias: bool = True, dropout_rate: float = 0.0, width_multiplier: float = 1.0,
                   groups: int = 1, style: str = "imagenet",
                   normalization_layer: Optional[Type[nn.Module]] = None) -> BatchedResNet:
    return BatchedResNet(in_channels, num_classes, arch, num_estimators, conv_bias=conv_bias,
                         dropout_rate=dropout_rate, width_multiplier=width_multiplier, groups=groups,
                         style=style, normalization_layer=normalization_layer)
