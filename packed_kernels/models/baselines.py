# SPDX-License-Identifier: Apache-2.0
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
from einops import rearrange, repeat
from torch import Tensor, nn

from ..nn.packed import GroupedConv2d
from ..nn.packing import STOCK, autocast_operands
from ..ops.conv import grouped_conv2d
from ._common import BASIC_BLOCK_ARCHS, NARROW_ARCHS, default_norm, resnet_blocks
from .._docs import with_arguments
from .resnet import BasicBlock, Bottleneck, PackedResNet, ResNetLayout, packed_resnet


@with_arguments
def resnet(in_channels: int, num_classes: int, arch: int, conv_bias: bool = False,
           width_multiplier: float = 1.0, groups: int = 1, dropout_rate: float = 0.0,
           style: str = "imagenet", normalization_layer: Optional[Type[nn.Module]] = None) -> PackedResNet:
    """The single ResNet (output (B, num_classes): M = 1)."""
    return packed_resnet(in_channels, num_classes, arch, num_estimators=1, alpha=1, gamma=1,
                         conv_bias=conv_bias, width_multiplier=width_multiplier, groups=groups,
                         dropout_rate=dropout_rate, style=style,
                         normalization_layer=normalization_layer)


@with_arguments
def deep_ensemble_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int,
                         conv_bias: bool = False, width_multiplier: float = 1.0,
                         dropout_rate: float = 0.0, style: str = "imagenet",
                         normalization_layer: Optional[Type[nn.Module]] = None) -> PackedResNet:
    """M independent ResNets as one block-diagonal network (see the module docstring)."""
    return packed_resnet(in_channels, num_classes, arch, num_estimators=num_estimators,
                         alpha=num_estimators, gamma=1, conv_bias=conv_bias,
                         width_multiplier=width_multiplier, dropout_rate=dropout_rate, style=style,
                         normalization_layer=normalization_layer)


@with_arguments
class MIMOResNet(PackedResNet):
    """Training input: (M*B, C, H, W), M batches (estimator-major) that the M subnetworks see
    side by side; eval input: (B, C, H, W), shown to every subnetwork. Output (M*B, classes)."""

    def __init__(self, num_estimators: int, **kwargs) -> None:
        """kwargs: PackedResNet's arguments (block, num_blocks, in_channels = M * the images'
        channels, num_classes = M * classes, ...), with alpha = gamma = 1."""
        super().__init__(num_estimators=1, alpha=1, gamma=1, **kwargs)
        self.num_estimators = num_estimators

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_estimators
        if not self.training:
            x = repeat(x, "b ... -> (m b) ...", m=m)
        if x.shape[0] % m:
            raise ValueError(f"MIMOResNet: training batch of {x.shape[0]} is not M={m} batches")
        # the M inputs side by side as channels, one subnetwork's logits per channel block
        out = super().forward(rearrange(x, "(m b) c ... -> b (m c) ...", m=m))
        return rearrange(out, "b (m k) -> (m b) k", m=m)


@with_arguments
def mimo_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int,
                conv_bias: bool = True, dropout_rate: float = 0.0, width_multiplier: float = 1.0,
                groups: int = 1, style: str = "imagenet",
                normalization_layer: Optional[Type[nn.Module]] = None) -> MIMOResNet:
    """MIMO ResNet-`arch` (torch-uncertainty's mimo_resnet): M subnetworks in one network whose
    input and output layers are M times wider; see MIMOResNet for its inputs. Output (M*B,
    num_classes), estimator-major."""
    num_blocks = resnet_blocks(arch)
    block = BasicBlock if arch in BASIC_BLOCK_ARCHS else Bottleneck
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
    `conv` holds the shared weight (torch-uncertainty's parameter names and shapes). Input
    (M*B, in_channels, H, W), estimator-major (block m of B rows is member m's); output
    (M*B, out_channels, H_out, W_out) in its dtype. The convolution runs on
    packed_kernels.grouped_conv2d with the layer's `backend` attribute (None: "auto"; set by
    packed_kernels.nn.set_backend; "stock": torch's nn.Conv2d).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: nn.Conv2d's.
        num_estimators: M, the members (>= 1); the batch must be a multiple of M.
        bias: a per-member bias (M, out_channels).
        device, dtype: of the parameters, as nn.Conv2d's."""

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
        _per_member(x, m, "BatchConv2d")
        x, weight, r, s, bias = autocast_operands(x, self.conv.weight, self.r_group, self.s_group, self.bias)
        scaled = rearrange(rearrange(x, "(m b) c h w -> m b c h w", m=m)
                           * rearrange(r, "m c -> m 1 c 1 1"), "m b c h w -> (m b) c h w")
        if self.backend == STOCK:
            out = self.conv(scaled)
        else:
            out = grouped_conv2d(scaled, weight, None, self.conv.stride, self.conv.padding,
                                 self.conv.dilation, self.conv.groups, backend=self.backend)
        out = rearrange(out, "(m b) c h w -> m b c h w", m=m) * rearrange(s, "m c -> m 1 c 1 1")
        if bias is not None:
            out = out + rearrange(bias, "m c -> m 1 c 1 1")
        return rearrange(out, "m b c h w -> (m b) c h w")


class BatchLinear(nn.Module):
    """BatchEnsemble linear layer (torch-uncertainty's parameter names and shapes):
    out_m = (W (x_m . r_m)) . s_m + bias_m. Input (M*B, in_features), estimator-major; output
    (M*B, out_features).

    Args:
        in_features, out_features: nn.Linear's.
        num_estimators: M, the members (>= 1); the batch must be a multiple of M.
        bias: a per-member bias (M, out_features).
        device, dtype: of the parameters, as nn.Linear's."""

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
        rows = rearrange(x, "(m b) ... -> m b (...)", b=b) * rearrange(self.r_group, "m f -> m 1 f")
        out = self.linear(rows) * rearrange(self.s_group, "m k -> m 1 k")
        if self.bias is not None:
            out = out + rearrange(self.bias, "m k -> m 1 k")
        return rearrange(out, "m b k -> (m b) k")


class BatchLayers:
    """The layers of a BatchEnsemble ResNet (torch-uncertainty's batched_resnet): BatchConv2d
    (shared weight, per-member rank-1 factors and biases), norms over `planes` channels, a
    shared GroupedConv2d projection in the basic block's shortcut but a BatchConv2d in the
    bottleneck's (as upstream), a BatchLinear head."""

    def __init__(self, num_estimators: int, groups: int, conv_bias: bool) -> None:
        self.num_estimators, self.groups, self.conv_bias = num_estimators, groups, conv_bias

    def width(self, planes: int) -> int:
        return planes

    def conv(self, in_planes: int, planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
             split: bool = True) -> nn.Module:
        return BatchConv2d(in_planes, planes, kernel_size, self.num_estimators, stride=stride,
                           padding=padding, groups=self.groups, bias=self.conv_bias)

    def shortcut_conv(self, in_planes: int, planes: int, stride: int, bottleneck: bool) -> nn.Module:
        if bottleneck:
            return self.conv(in_planes, planes, 1, stride=stride)
        return GroupedConv2d(in_planes, planes, 1, stride=stride, groups=self.groups, bias=self.conv_bias)

    def stem_conv(self, in_channels: int, planes: int, **geometry) -> nn.Module:
        return BatchConv2d(in_channels, planes, num_estimators=self.num_estimators, groups=self.groups,
                           bias=False, **geometry)

    def head(self, features: int, num_classes: int) -> nn.Module:
        return BatchLinear(features, num_classes, self.num_estimators)


@with_arguments
class BatchedResNet(ResNetLayout):
    """BatchEnsemble ResNet: input (B, C, H, W) is repeated M times; output (M*B, classes)."""

    def __init__(self, in_channels: int, num_classes: int, arch: int, num_estimators: int,
                 conv_bias: bool = True, dropout_rate: float = 0.0, width_multiplier: float = 1.0,
                 groups: int = 1, style: str = "imagenet",
                 normalization_layer: Optional[Type[nn.Module]] = None) -> None:
        super().__init__()
        num_blocks = resnet_blocks(arch)
        block = BasicBlock if arch in BASIC_BLOCK_ARCHS else Bottleneck
        self.num_estimators = num_estimators
        self._build_layout(BatchLayers(num_estimators, groups, conv_bias), block, num_blocks,
                           in_channels, num_classes,
                           int((16 if arch in NARROW_ARCHS else 64) * width_multiplier), style,
                           normalization_layer or default_norm(), dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(repeat(x, "b ... -> (m b) ...", m=self.num_estimators))


@with_arguments
def batched_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int,
                   conv_bias: bool = True, dropout_rate: float = 0.0, width_multiplier: float = 1.0,
                   groups: int = 1, style: str = "imagenet",
                   normalization_layer: Optional[Type[nn.Module]] = None) -> BatchedResNet:
    """BatchEnsemble ResNet-`arch` (torch-uncertainty's batched_resnet): input (B, C, H, W),
    repeated M times; output (M*B, num_classes), estimator-major."""
    return BatchedResNet(in_channels, num_classes, arch, num_estimators, conv_bias=conv_bias,
                         dropout_rate=dropout_rate, width_multiplier=width_multiplier, groups=groups,
                         style=style, normalization_layer=normalization_layer)
