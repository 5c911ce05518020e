# SPDX-License-Identifier: Apache-2.0
"""Pieces shared by the model zoo: architecture tables, styles and the default norm layer."""

from __future__ import annotations

from typing import Callable, List, Optional, Type, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.batch_norm import BatchNorm2d
from ..nn.conv_bn import DeferredBatchNorm, conv_bn_act, fusable_conv, materialize

# Blocks per stage, as torch-uncertainty 0.13 (and the ResNet papers) define them.
RESNET_BLOCKS = {
    18: [2, 2, 2, 2], 20: [3, 3, 3], 34: [3, 4, 6, 3], 44: [7, 7, 7], 50: [3, 4, 6, 3],
    56: [9, 9, 9], 101: [3, 4, 23, 3], 110: [18, 18, 18], 152: [3, 8, 36, 3],
}
BASIC_BLOCK_ARCHS = (18, 20, 34, 44, 56, 110)  # others use bottlenecks
NARROW_ARCHS = (20, 44, 56, 110)  # the CIFAR family: 16 planes, 3 stages
STYLES = ("imagenet", "cifar")


def resnet_blocks(arch: int) -> List[int]:
    if arch not in RESNET_BLOCKS:
        raise ValueError(f"unknown ResNet architecture {arch!r}; choose one of {sorted(RESNET_BLOCKS)}")
    return RESNET_BLOCKS[arch]


def check_style(style) -> str:
    style = getattr(style, "value", style)  # accept torch-uncertainty's ResNetStyle enum too
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return style


def default_norm() -> Type[nn.Module]:
    """The models' norm layer: packed_kernels.nn.BatchNorm2d (a drop-in nn.BatchNorm2d)."""
    return BatchNorm2d


def fuses(norm: Type[nn.Module]) -> bool:
    """Whether `norm` is packed_kernels.nn.BatchNorm2d, which adds a residual
    (forward(x, residual=...)) and applies ReLU in the same kernel pass as the normalisation."""
    return isinstance(norm, type) and issubclass(norm, BatchNorm2d)


def make_norm(norm: Type[nn.Module], num_features: int, relu: bool) -> nn.Module:
    """`norm(num_features)`, with the following ReLU folded in when `norm` fuses(). Same
    parameters and state_dict either way, so checkpoints move freely between the two."""
    if fuses(norm):
        return norm(num_features, activation="relu" if relu else None)
    return norm(num_features)


def conv_norm_act(x: Union[Tensor, DeferredBatchNorm], conv: nn.Module, norm: nn.Module, fused: bool,
                  residual: Optional[Tensor] = None, relu: bool = True, defer: bool = False,
                  activation_fn: Callable = F.relu) -> Union[Tensor, DeferredBatchNorm]:
    """act(norm(conv(x)) [+ residual]). `fused` (the norm fuses(), built by make_norm): on
    conv_bn_act when the conv can run there (BN in the conv epilogue at inference, statistics
    from the epilogue in training, deferred into the next conv's prologue with `defer`), else
    the norm module's own BN (+ residual) + ReLU pass (its `activation` says whether it applies
    ReLU); unfused: the modules one after another. An unfused result is always a tensor."""
    if fused and fusable_conv(conv):
        return conv_bn_act(x, conv, norm, residual, "relu" if relu else None, defer)
    out = conv(materialize(x))
    if fused:
        return norm(out, residual=residual)
    out = norm(out)
    if residual is not None:
        out = out + residual
    return activation_fn(out) if relu else out


def dropout_active(dropout: nn.Module) -> bool:
    return dropout.training and dropout.p > 0


def dropout_between(dropout: nn.Module, x: Union[Tensor, DeferredBatchNorm]):
    """Dropout between two convolutions. When it is a no-op (eval, or p = 0) a deferred batch
    norm stays deferred into the next conv's prologue; an active one needs the activation."""
    return dropout(materialize(x)) if dropout_active(dropout) else x


def shortcut_forward(shortcut: nn.Sequential, x: Tensor, fused: bool) -> Tensor:
    """A ResNet shortcut: identity (empty), or Sequential(conv, norm) with no activation."""
    if len(shortcut) == 0:
        return x
    conv, norm = shortcut
    return conv_norm_act(x, conv, norm, fused, relu=False)
