# SPDX-License-Identifier: Apache-2.0
"""Masksembles layers (Durasov et al., CVPR 2021), drop-in for torch-uncertainty 0.13's
MaskedConv2d and MaskedLinear: same arguments, state_dict (`mask.masks`, `conv.*` /
`linear.*`) and outputs for the same masks.

Member m of an M-member Masksemble multiplies its input channels by a fixed binary mask
masks[m] before a layer whose weights all members share. The input is estimator-major: M
blocks of B rows, block m for member m. The convolution is a GroupedConv2d, so it runs on
packed_kernels.grouped_conv2d (packed_kernels.nn.set_backend applies).

Mask generation follows the reference algorithm: each of n masks sets `ones` positions out of
int(ones * scale) at random; positions no mask sets are dropped; draws are repeated until the
expected width int(ones * scale * (1 - (1 - 1/scale)^n)) comes out; and for a layer of C
channels the scale is bisected until the width is exactly C."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from .packed import GroupedConv2d

MIN_CHANNELS = 10
MAX_SCALE = 6.0


def _draw_masks(ones: int, num_masks: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    positions = int(ones * scale)
    masks = np.zeros((num_masks, positions))
    for mask in masks:
        mask[rng.choice(positions, ones, replace=False)] = 1
    return masks[:, masks.any(axis=0)]  # positions that no mask keeps carry no feature


def generate_masks(ones: int, num_masks: int, scale: float,
                   rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """`num_masks` binary masks with `ones` ones each, of the width `scale` gives on average."""
    rng = np.random.default_rng() if rng is None else rng
    expected_width = int(ones * scale * (1 - (1 - 1 / scale) ** num_masks))
    masks = _draw_masks(ones, num_masks, scale, rng)
    while masks.shape[1] != expected_width:
        masks = _draw_masks(ones, num_masks, scale, rng)
    return masks


def masks_for_channels(channels: int, num_masks: int, scale: float,
                       rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """(num_masks, channels) binary masks whose overlap `scale` controls (1: identical masks;
    larger: sparser, less overlapping ones)."""
    if channels < MIN_CHANNELS:
        raise ValueError(f"Masksembles needs at least {MIN_CHANNELS} channels, got {channels}: "
                         "widen the layer or leave it unmasked")
    if scale > MAX_SCALE:
        raise ValueError(f"Masksembles needs scale <= {MAX_SCALE}, got {scale}")
    rng = np.random.default_rng() if rng is None else rng
    ones = int(int(channels) / (scale * (1 - (1 - 1 / scale) ** num_masks)))
    masks = generate_masks(ones, num_masks, scale, rng)
    # The width is random around its expectation: bisect the scale until it is `channels`.
    low, high = max(0.2 * scale, 1.0), 4 * scale
    trial = (low + high) / 2
    width = -1
    while width != channels:
        masks = generate_masks(ones, num_masks, trial, rng)
        width = masks.shape[-1]
        if width < channels:
            low = trial
        elif width > channels:
            high = trial
        trial = (low + high) / 2
    return masks


def _check_scale(layer: str, scale) -> None:
    if scale is None:
        raise ValueError(f"{layer}: you must specify `scale`")
    if scale < 1:
        raise ValueError(f"{layer}: `scale` must be >= 1, got {scale}")


class ChannelMasks(nn.Module):
    """Multiplies member m's rows (block m of the estimator-major batch) by masks[m] over the
    channel dimension (dim 1). `masks` is a parameter that does not require grad, as upstream
    (so it is in parameters() and the state_dict)."""

    def __init__(self, channels: int, num_masks: int, scale: float, device=None,
                 rng: Optional[np.random.Generator] = None) -> None:
        super().__init__()
        self.num_masks = num_masks
        masks = torch.from_numpy(masks_for_channels(channels, num_masks, scale, rng))
        # float64 as upstream: the 0/1 values are exact in every dtype
        self.masks = nn.Parameter(masks.to(device=device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_masks
        if x.shape[0] % m:
            raise ValueError(f"{type(self).__name__}: batch of {x.shape[0]} is not divisible by "
                             f"the {m} masks (inputs are estimator-major: M blocks of B rows)")
        per_member = rearrange(x, "(m b) ... -> m b ...", m=m)
        # (M, C) masks broadcast over each member's rows and any spatial dimensions
        masks = self.masks.to(x.dtype).view(m, 1, -1, *([1] * (x.dim() - 2)))
        return rearrange(per_member * masks, "m b ... -> (m b) ...")


class MaskedConv2d(nn.Module):
    """Masksembles Conv2d: torch-uncertainty's arguments; conv(mask(x)). Input (M*B, C, H, W),
    estimator-major (block m of B rows is member m's); the convolution is a GroupedConv2d
    (pk.grouped_conv2d; packed_kernels.nn.set_backend applies).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            nn.Conv2d's.
        num_estimators: M, the members (one binary channel mask each).
        scale: Masksembles' scale (> 1): how far the masks overlap.
        device, dtype: of the parameters and masks.
        rng: the numpy Generator drawing the masks (None: a fresh one)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_estimators: int,
                 scale: float, stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 device=None, dtype=None, rng: Optional[np.random.Generator] = None) -> None:
        super().__init__()
        _check_scale("MaskedConv2d", scale)
        self.mask = ChannelMasks(in_channels, num_estimators, scale, device=device, rng=rng)
        self.conv = GroupedConv2d(in_channels, out_channels, kernel_size, stride=stride,
                                  padding=padding, dilation=dilation, groups=groups, bias=bias,
                                  padding_mode="zeros", device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.mask(x))


class MaskedLinear(nn.Module):
    """Masksembles Linear: torch-uncertainty's arguments; linear(mask(x)). Input
    (M*B, in_features), estimator-major.

    Args:
        in_features, out_features, bias: nn.Linear's.
        num_estimators: M, the members (one binary feature mask each).
        scale: Masksembles' scale (> 1): how far the masks overlap.
        device, dtype: of the parameters and masks.
        rng: the numpy Generator drawing the masks (None: a fresh one)."""

    def __init__(self, in_features: int, out_features: int, num_estimators: int, scale: float,
                 bias: bool = True, device=None, dtype=None,
                 rng: Optional[np.random.Generator] = None) -> None:
        super().__init__()
        _check_scale("MaskedLinear", scale)
        self.mask = ChannelMasks(in_features, num_estimators, scale, device=device, rng=rng)
        self.linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.mask(x))
