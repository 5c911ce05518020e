# SPDX-License-Identifier: Apache-2.0
"""Packed-Ensembles convolutions, drop-in for torch-uncertainty 0.13's PackedConv1d/2d/3d and
PackedConvTranspose2d, and GroupedConv2d (a grouped nn.Conv2d on our op).

Same constructor arguments and defaults, same channel and group rules (packing.py), same
state_dict keys and shapes (a torch-uncertainty checkpoint of the layer loads with strict=True),
same outputs. The 1-D and 2-D convolutions run through packed_kernels.grouped_conv2d on the
layer's `backend` (set_backend); PackedConv3d and PackedConvTranspose2d run torch's own.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .._docs import with_layer_arguments
from ..ops.conv import grouped_conv2d
from .packing import STOCK, autocast_operands, estimator_major, packed_conv_geometry

_MODES = ("zeros", "reflect", "replicate", "circular")


def _wrapping(cls, conv_cls, conv: nn.Module, num_estimators: int, first: bool, last: bool):
    """A bare `cls` module for from_conv() to wrap `conv` in (an exact `conv_cls`), with its
    estimator settings checked and set."""
    if type(conv) is not conv_cls:
        raise TypeError(f"{cls.__name__}.from_conv needs an nn.{conv_cls.__name__}, "
                        f"got {type(conv).__name__}")
    if (isinstance(num_estimators, bool) or not isinstance(num_estimators, int)
            or num_estimators < 1 or (last and conv.out_channels % num_estimators)):
        raise ValueError(f"{cls.__name__}.from_conv: num_estimators={num_estimators!r} does "
                         f"not fit a conv with {conv.out_channels} output channels")
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.first, layer.last, layer.num_estimators = first, last, num_estimators
    return layer


class _PackedConvNd(nn.Module):
    """Shared body of PackedConv1d/2d: the geometry, an inner nn.ConvNd named `conv` (so the
    state_dict keys are torch-uncertainty's conv.weight / conv.bias) and the `last` rearrange."""

    _conv_cls = nn.Conv2d
    _spatial_dims = 2
    routes_through_packed_ops = True  # set_backend() applies
    backend: Optional[str] = None  # class default: also right for pickles made before it existed

    def __init__(self, in_channels: int, out_channels: int, kernel_size, alpha: float,
                 num_estimators: int, gamma: int = 1, stride=1, padding=0, dilation=1,
                 groups: int = 1, minimum_channels_per_group: int = 64, bias: bool = True,
                 padding_mode: str = "zeros", first: bool = False, last: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        layer = type(self).__name__
        if padding_mode not in _MODES:
            raise ValueError(f"{layer}: padding_mode must be one of {_MODES}, got {padding_mode!r}")
        ext_in, ext_out, conv_groups = packed_conv_geometry(
            layer, in_channels, out_channels, alpha, num_estimators, gamma, groups,
            minimum_channels_per_group, first, last)
        self.first = first
        self.last = last
        self.num_estimators = num_estimators
        self.conv = self._conv_cls(ext_in, ext_out, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=conv_groups, bias=bias,
                                   padding_mode=padding_mode, device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Module, num_estimators: int, first: bool = False,
                  last: bool = False):
        """Wrap an existing inner convolution (weights shared, not copied): used by convert()."""
        layer = _wrapping(cls, cls._conv_cls, conv, num_estimators, first, last)
        layer.conv = conv
        return layer

    @property
    def weight(self) -> Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.conv.bias

    def _padded(self, x: Tensor) -> Tensor:
        if self.conv.padding_mode == "zeros":
            return x
        return F.pad(x, self.conv._reversed_padding_repeated_twice, mode=self.conv.padding_mode)

    def _padding(self):
        return 0 if self.conv.padding_mode != "zeros" else self.conv.padding

    def forward(self, x: Tensor) -> Tensor:
        batched = 2 + self._spatial_dims  # (N, C, *spatial)
        if not isinstance(x, Tensor) or x.dim() not in (batched - 1, batched):
            raise ValueError(f"{type(self).__name__}: input must have {batched} dimensions (batched) "
                             f"or {batched - 1} (unbatched), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        unbatched = x.dim() == batched - 1  # as torch's convs: a batch of one, without its dim
        out = self._conv_forward(x.unsqueeze(0) if unbatched else x)
        if self.last:  # estimator-major rows: M of them for one sample
            return estimator_major(out, self.num_estimators)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"num_estimators={self.num_estimators}, first={self.first}, last={self.last}"


@with_layer_arguments
class PackedConv2d(_PackedConvNd):
    """Packed-Ensembles Conv2d: torch-uncertainty's arguments, defaults and state_dict.
    Input (B, C, H, W) or unbatched (C, H, W), NCHW or channels_last, float32 / float16 /
    bfloat16 (any float dtype on "torch" and "stock"); output in the input's dtype.
    The convolution runs on pk.grouped_conv2d with the layer's `backend` attribute: None (the
    op picks: "auto"), one of packed_kernels.BACKENDS, or "stock" (torch's own module); set it
    with packed_kernels.nn.set_backend."""

    _conv_cls = nn.Conv2d

    def _conv_forward(self, x: Tensor) -> Tensor:
        if self.backend == STOCK:
            return self.conv(x)
        x, weight, bias = autocast_operands(self._padded(x), self.conv.weight, self.conv.bias)
        return grouped_conv2d(x, weight, bias, self.conv.stride, self._padding(),
                              self.conv.dilation, self.conv.groups, backend=self.backend)


@with_layer_arguments
class PackedConv1d(_PackedConvNd):
    """Packed-Ensembles Conv1d, run as a 2-D grouped convolution of height 1. Input (B, C, L)
    or unbatched (C, L).
    The convolution runs on pk.grouped_conv2d with the layer's `backend` attribute: None (the
    op picks: "auto"), one of packed_kernels.BACKENDS, or "stock" (torch's own module); set it
    with packed_kernels.nn.set_backend."""

    _conv_cls = nn.Conv1d
    _spatial_dims = 1

    def _conv_forward(self, x: Tensor) -> Tensor:
        if self.backend == STOCK:
            return self.conv(x)
        x, weight, bias = autocast_operands(self._padded(x), self.conv.weight, self.conv.bias)
        padding = self._padding()
        if not isinstance(padding, str):
            padding = (0, padding if isinstance(padding, int) else padding[0])
        out = grouped_conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, self.conv.stride[0]),
                             padding, (1, self.conv.dilation[0]), self.conv.groups,
                             backend=self.backend).squeeze(2)
        return out


@with_layer_arguments
class PackedConv3d(_PackedConvNd):
    """Packed-Ensembles Conv3d: torch-uncertainty's arguments, defaults and state_dict, on
    torch's own nn.Conv3d (the library's kernels are 2-D)."""

    _conv_cls = nn.Conv3d
    _spatial_dims = 3
    routes_through_packed_ops = False  # set_backend() has nothing to route

    def _conv_forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


@with_layer_arguments
class PackedConvTranspose2d(nn.Module):
    """Packed-Ensembles ConvTranspose2d: torch-uncertainty's arguments, defaults and state_dict
    (the inner nn.ConvTranspose2d is `conv_transpose`), on torch's own transposed convolution.
    Same channel and group rules as PackedConv2d; a `last` layer returns estimator-major rows."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, alpha: float,
                 num_estimators: int, gamma: int = 1, stride=1, padding=0, output_padding=0,
                 dilation=1, groups: int = 1, minimum_channels_per_group: int = 64,
                 bias: bool = True, first: bool = False, last: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        ext_in, ext_out, conv_groups = packed_conv_geometry(
            "PackedConvTranspose2d", in_channels, out_channels, alpha, num_estimators, gamma,
            groups, minimum_channels_per_group, first, last)
        self.num_estimators, self.first, self.last = num_estimators, first, last
        # torch-uncertainty's attribute names
        self.extended_in_channels, self.extended_out_channels = ext_in, ext_out
        self.actual_groups = conv_groups
        self.conv_transpose = nn.ConvTranspose2d(
            ext_in, ext_out, kernel_size, stride=stride, padding=padding,
            output_padding=output_padding, dilation=dilation, groups=conv_groups, bias=bias,
            device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.ConvTranspose2d, num_estimators: int, first: bool = False,
                  last: bool = False) -> "PackedConvTranspose2d":
        """Wrap an existing nn.ConvTranspose2d (weights shared, not copied): used by convert()."""
        layer = _wrapping(cls, nn.ConvTranspose2d, conv, num_estimators, first, last)
        layer.extended_in_channels, layer.extended_out_channels = conv.in_channels, conv.out_channels
        layer.actual_groups = conv.groups
        layer.conv_transpose = conv
        return layer

    @property
    def weight(self) -> Tensor:
        return self.conv_transpose.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.conv_transpose.bias

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        out = self.conv_transpose(x, output_size)
        if not self.last:
            return out
        if out.dim() == 3:  # unbatched: one sample, M rows
            return estimator_major(out.unsqueeze(0), self.num_estimators)
        return estimator_major(out, self.num_estimators)

    def extra_repr(self) -> str:
        return f"num_estimators={self.num_estimators}, first={self.first}, last={self.last}"


class GroupedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) whose forward runs packed_kernels.grouped_conv2d;
    convert() puts it in place of grouped nn.Conv2d layers.

    Args: nn.Conv2d's (in_channels, out_channels, kernel_size, stride, padding, dilation,
    groups, bias, padding_mode, device, dtype), with the same meaning. Input (B, C, H, W) or
    unbatched, NCHW or channels_last; the `backend` attribute (None: the op picks; one of
    packed_kernels.BACKENDS; "stock": nn.Conv2d's own forward) is set by set_backend."""

    routes_through_packed_ops = True
    backend: Optional[str] = None  # see set_backend()

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == STOCK:
            return super().forward(x)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        x, weight, bias = autocast_operands(x, self.weight, self.bias)
        return grouped_conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups,
                              backend=self.backend)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "GroupedConv2d":
        """Same hyper-parameters, sharing `conv`'s parameter tensors (nothing is copied)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta", dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new
