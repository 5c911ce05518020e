"""Block-diagonal grouped 2-D convolution with the semantics of torch.nn.functional.conv2d."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._checks import check_float_tensor, check_positive_int, check_same_device_dtype
from ._autograd import unaliased

IntPair = Union[int, Sequence[int]]
IMPLEMENTED = ("torch",)  # the Triton and CUDA kernels register here as they land


def _pair(op: str, name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def conv_geometry(op: str, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                  dilation, groups):
    """Validate a conv2d call; returns (stride, padding4, dilation) with padding as
    (top, bottom, left, right) so "same" with an even kernel is exact, as in torch."""
    check_float_tensor(op, "input", input, min_dim=4)
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
    out_h = (input.shape[2] + padding4[0] + padding4[1] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (input.shape[3] + padding4[2] + padding4[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: input of spatial size {tuple(input.shape[2:])} is too small for a "
                         f"{tuple(kernel)} kernel with dilation {dilation} and padding {padding!r}")
    return stride, padding4, dilation


def reference_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    top, bottom, left, right = padding
    if top != bottom or left != right:  # "same" with an even kernel: pad the extra row/col first
        input = F.pad(input, (left, right, top, bottom))
        top = left = 0
    return F.conv2d(input, weight, bias, tuple(stride), (top, left), tuple(dilation), groups)


def reference_conv2d_backward(grad: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                              groups: int):
    top, bottom, left, right = padding
    padded = input
    if top != bottom or left != right:
        padded = F.pad(input, (left, right, top, bottom))
        pad_hw = (0, 0)
    else:
        pad_hw = (top, left)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, padded, weight, [weight.shape[0]] if has_bias else None, list(stride), list(pad_hw),
        list(dilation), False, [0, 0], groups, [True, True, has_bias])
    if padded is not input:
        grad_input = grad_input[:, :, top:top + input.shape[2], left:left + input.shape[3]]
    return grad_input.contiguous(memory_format=_format_of(input)), grad_weight, grad_bias


@torch.library.custom_op("packed_kernels::grouped_conv2d", mutates_args=())
def _grouped_conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int], groups: int, backend: str) -> Tensor:
    return reference_conv2d(input, weight, bias, stride, padding, dilation, groups)


@_grouped_conv2d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, backend):
    kh, kw = weight.shape[2:]
    out_h = (input.shape[2] + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (input.shape[3] + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return torch.empty((input.shape[0], weight.shape[0], out_h, out_w), dtype=input.dtype,
                       device=input.device, memory_format=_format_of(input))


@torch.library.custom_op("packed_kernels::grouped_conv2d_backward", mutates_args=())
def _grouped_conv2d_backward_op(grad: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                groups: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grad_input, grad_weight, grad_bias = reference_conv2d_backward(
        grad, input, weight, has_bias, stride, padding, dilation, groups)
    return unaliased((grad_input, grad_weight, grad_bias), (grad, input, weight), input)


@_grouped_conv2d_backward_op.register_fake
def _(grad, input, weight, has_bias, stride, padding, dilation, groups, backend):
    return (torch.empty_like(input), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if has_bias else 0))


def _format_of(t: Tensor):
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, backend = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups, backend)


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = _grouped_conv2d_backward_op(
        grad, input, weight, ctx.has_bias, *ctx.args)
    return grad_input, grad_weight, (grad_bias if ctx.has_bias else None), None, None, None, None, None


_grouped_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                   padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
                   backend: Optional[str] = None) -> Tensor:
    """torch.nn.functional.conv2d semantics, block-diagonal over `groups`."""
    op = "grouped_conv2d"
    stride, padding4, dilation = conv_geometry(op, input, weight, bias, stride, padding, dilation, groups)
    chosen = _backend.resolve(op, backend, input.device, input.dtype, IMPLEMENTED)
    return _grouped_conv2d_op(input, weight, bias, list(stride), list(padding4), list(dilation),
                              groups, chosen)
