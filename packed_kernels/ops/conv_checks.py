# SPDX-License-Identifier: Apache-2.0
"""The argument checks of the conv ops (grouped_conv2d, fused_conv2d): every bad argument is
named in a Python error before any launch. Results are cached per call signature
(ValidatedCalls), so a training loop's repeated calls are checked once."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import (ValidatedCalls, check_float_tensor, check_positive_int,
                      check_same_device_dtype, compiled_call_signature, signature_of)
from .._conventions import check_activation
from .conv_reference import output_hw

IntPair = Union[int, Sequence[int]]


def _pair(op: str, name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)):
        pair = tuple(value)
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def conv_geometry(op: str, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                  dilation, groups):
    """Validate a conv2d call; returns (stride, padding4, dilation) with padding as
    (top, bottom, left, right) so "same" with an even kernel is exact, as in torch."""
    check_float_tensor(op, "input", input, min_dim=4, allow_empty_batch=True)
    check_float_tensor(op, "weight", weight, min_dim=4)
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}: input must be (N, C, H, W) and weight (C_out, C_in/groups, kH, kW), "
                         f"got {tuple(input.shape)} and {tuple(weight.shape)}")
    check_same_device_dtype(op, "input", input, weight=weight, bias=bias)
    groups = check_positive_int(op, "groups", groups)
    c_in, c_out = input.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups:
        raise ValueError(f"{op}: in_channels ({c_in}) and out_channels ({c_out}) must both be "
                         f"divisible by groups ({groups})")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"{op}: weight of shape {tuple(weight.shape)} expects "
                         f"{weight.shape[1] * groups} input channels with groups={groups}, "
                         f"input has {c_in}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    stride = _pair(op, "stride", stride, 1)
    dilation = _pair(op, "dilation", dilation, 1)
    kernel = weight.shape[2:]
    if isinstance(padding, str):
        if padding == "valid":
            padding4 = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            padding4 = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
        else:
            raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    else:
        ph, pw = _pair(op, "padding", padding, 0)
        padding4 = (ph, ph, pw, pw)
    out_h, out_w = output_hw(input.shape[2:], weight, stride, padding4, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: input of spatial size {tuple(input.shape[2:])} is too small for a "
                         f"{tuple(kernel)} kernel with dilation {dilation} and padding {padding!r}")
    return stride, padding4, dilation


def _check_channel_vector(op: str, name: str, value, channels: int, input: Tensor) -> None:
    if value is None:
        return
    check_float_tensor(op, name, value)
    if value.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16):
        # float32 vectors with 16-bit activations (folded BatchNorm statistics keep their
        # precision, and so do their gradients)
        check_same_device_dtype(op, "input", input.new_empty(0, dtype=torch.float32), **{name: value})
    else:
        check_same_device_dtype(op, "input", input, **{name: value})
    if tuple(value.shape) != (channels,):
        raise ValueError(f"{op}: {name} must have shape ({channels},), got {tuple(value.shape)}")


def _check_fused_call(input, weight, bias, stride, padding, dilation, groups, in_scale, in_shift,
                      in_activation, out_scale, out_shift, residual, activation, channel_stats):
    """fused_conv2d's argument checks; returns (stride, padding4, dilation)."""
    op = "fused_conv2d"
    stride, padding4, dilation = conv_geometry(op, input, weight, bias, stride, padding, dilation, groups)
    for name, value in (("in_scale", in_scale), ("in_shift", in_shift)):
        _check_channel_vector(op, name, value, input.shape[1], input)
    for name, value in (("out_scale", out_scale), ("out_shift", out_shift)):
        _check_channel_vector(op, name, value, weight.shape[0], input)
    check_activation(op, "in_activation", in_activation)
    check_activation(op, "activation", activation)
    if not isinstance(channel_stats, bool):
        raise TypeError(f"{op}: channel_stats must be a bool, got {type(channel_stats).__name__}")
    out_hw = output_hw(input.shape[2:], weight, stride, padding4, dilation)
    if residual is not None:
        check_float_tensor(op, "residual", residual)
        check_same_device_dtype(op, "input", input, residual=residual)
        expected = (input.shape[0], weight.shape[0], *out_hw)
        if tuple(residual.shape) != expected:
            raise ValueError(f"{op}: residual must have the output's shape {expected}, got "
                             f"{tuple(residual.shape)}")
    return stride, padding4, dilation


def _grouped_signature(input, weight, bias, stride, padding, dilation, groups):
    """signature_of's key of a conv call, written out: an int stands for itself (no other
    signature equals an int, so True, 2.0 or (1, 1) still key apart from it)."""
    return (input.__class__, input.shape, input.dtype, input.device,
            weight.__class__, weight.shape, weight.dtype, weight.device,
            None if bias is None else signature_of(bias),
            stride if stride.__class__ is int else signature_of(stride),
            padding if padding.__class__ is int else signature_of(padding),
            dilation if dilation.__class__ is int else signature_of(dilation),
            groups if groups.__class__ is int else signature_of(groups))


def _fused_signature(input, weight, bias, stride, padding, dilation, groups, in_scale, in_shift,
                     in_activation, out_scale, out_shift, residual, activation, channel_stats):
    """As _grouped_signature, a str or bool standing for itself."""
    return (_grouped_signature(input, weight, bias, stride, padding, dilation, groups),
            None if in_scale is None else signature_of(in_scale),
            None if in_shift is None else signature_of(in_shift),
            None if out_scale is None else signature_of(out_scale),
            None if out_shift is None else signature_of(out_shift),
            None if residual is None else signature_of(residual),
            in_activation if in_activation is None or in_activation.__class__ is str
            else signature_of(in_activation),
            activation if activation is None or activation.__class__ is str else signature_of(activation),
            channel_stats if channel_stats.__class__ is bool else signature_of(channel_stats))


def _torch_int_arg(pair: Tuple[int, int]) -> IntPair:
    """An (h, w) pair as F.conv2d takes it most cheaply: an int where h == w (parsing a tuple
    costs the default path ~1 us per call, python -m bench overhead)."""
    return pair[0] if pair[0] == pair[1] else pair


def _grouped_call(input, weight, bias, stride, padding, dilation, groups):
    """conv_geometry's (stride, padding4, dilation), and F.conv2d's (stride, padding, dilation)
    where the default engine is torch's own conv (a tensor off CUDA, padding the same on both
    sides), None elsewhere: the cached answer that lets the default CPU call go straight to
    F.conv2d."""
    stride, padding4, dilation = conv_geometry("grouped_conv2d", input, weight, bias, stride,
                                               padding, dilation, groups)
    top, bottom, left, right = padding4
    torch_conv = None
    if top == bottom and left == right and not input.is_cuda:
        torch_conv = tuple(map(_torch_int_arg, (stride, (top, left), dilation)))
    return stride, padding4, dilation, torch_conv


_grouped_calls = ValidatedCalls(_grouped_call, _grouped_signature)
_fused_calls = ValidatedCalls(_check_fused_call, _fused_signature)

# The ops' entry points look a seen call up themselves, its arguments passed by name (generic
# *args forwarding costs the hot path about 1.5 us per call, python -m bench overhead); `eager`:
# not under a tracer, where the compiled signature may key the call.


def validated_grouped_call(eager, input, weight, bias, stride, padding, dilation, groups):
    """_grouped_call's answer, checked once per call signature."""
    key = eager and compiled_call_signature is not None and compiled_call_signature(
        input, weight, bias, stride, padding, dilation, groups)
    try:
        return _grouped_calls.entries[key or _grouped_signature(
            input, weight, bias, stride, padding, dilation, groups)]
    except (KeyError, TypeError, AttributeError):  # new, unhashable or not tensors
        return _grouped_calls.check(key or None, input, weight, bias, stride, padding, dilation,
                                    groups)


def validated_fused_call(eager, input, weight, bias, stride, padding, dilation, groups, in_scale,
                         in_shift, in_activation, out_scale, out_shift, residual, activation,
                         channel_stats):
    """_check_fused_call's answer, checked once per call signature."""
    key = eager and compiled_call_signature is not None and compiled_call_signature(
        input, weight, bias, stride, padding, dilation, groups, in_scale, in_shift,
        in_activation, out_scale, out_shift, residual, activation, channel_stats)
    try:
        return _fused_calls.entries[key or _fused_signature(
            input, weight, bias, stride, padding, dilation, groups, in_scale, in_shift,
            in_activation, out_scale, out_shift, residual, activation, channel_stats)]
    except (KeyError, TypeError, AttributeError):
        return _fused_calls.check(key or None, input, weight, bias, stride, padding, dilation,
                                  groups, in_scale, in_shift, in_activation, out_scale, out_shift,
                                  residual, activation, channel_stats)
