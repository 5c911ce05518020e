# SPDX-License-Identifier: Apache-2.0
"""The torch semantics of the grouped convolution and its fusions: what every engine is tested
against, the torch engine itself, and the backward's per-channel glue where Triton does not run.

fusion hooks: prologue act(x * in_scale + in_shift) per input channel, epilogue
act(y * out_scale + out_shift + residual) per output channel."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conventions import stats_dtype
from .._layouts import format_of


def reference_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    top, bottom, left, right = padding
    if top != bottom or left != right:  # "same" with an even kernel: pad the extra row/col first
        input = F.pad(input, (left, right, top, bottom))
        top = left = 0
    return F.conv2d(input, weight, bias, tuple(stride), (top, left), tuple(dilation), groups)


def reference_conv2d_backward(grad: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                              groups: int, output_mask: Sequence[bool] = (True, True)):
    """(grad_input, grad_weight, grad_bias) in closed form; entries not in output_mask are None."""
    top, bottom, left, right = padding
    padded = input
    if top != bottom or left != right:
        padded = F.pad(input, (left, right, top, bottom))
        pad_hw = (0, 0)
    else:
        pad_hw = (top, left)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, padded, weight, [weight.shape[0]] if has_bias else None, list(stride), list(pad_hw),
        list(dilation), False, [0, 0], groups, [output_mask[0], output_mask[1], has_bias])
    if grad_input is not None:
        if padded is not input:
            grad_input = grad_input[:, :, top:top + input.shape[2], left:left + input.shape[3]]
        grad_input = grad_input.contiguous(memory_format=format_of(input))
    return grad_input, grad_weight, grad_bias


def output_hw(input_hw, weight: Tensor, stride, padding, dilation):
    kh, kw = weight.shape[2:]
    out_h = (input_hw[0] + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (input_hw[1] + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out_h, out_w


def per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def _activate(x: Tensor, activation: Optional[str]) -> Tensor:
    return torch.relu(x) if activation == "relu" else x


def reference_prologue(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                       activation: Optional[str]) -> Tensor:
    """x_hat = act(x * scale + shift); the conv then zero-pads x_hat (padding stays zero)."""
    dtype = x.dtype  # float32 scale/shift with 16-bit x: computed in float32, x_hat in x's dtype
    if scale is not None:
        x = x * per_channel(scale)
    if shift is not None:
        x = x + per_channel(shift)
    return _activate(x, activation).to(dtype)


def reference_epilogue(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                       residual: Optional[Tensor], activation: Optional[str]) -> Tensor:
    dtype = y.dtype
    if scale is not None:
        y = y * per_channel(scale)
    if shift is not None:
        y = y + per_channel(shift)
    if residual is not None:
        y = y + residual
    return _activate(y, activation).to(dtype)


def reference_channel_stats(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of y over (N, H, W), fp32 (fp64 for fp64)."""
    compute = stats_dtype(y.dtype)
    var, mean = torch.var_mean(y if y.dtype == compute else y.to(compute), (0, 2, 3), correction=0)
    return mean, var


def epilogue_glue(grad_out, out, y, out_scale, grad_stats, residual, activation, dtype,
                   need_sum_grad_y=True, need_sum_grad_z=True):
    """Torch reference of conv_glue.epilogue_backward: (grad_y in `dtype`, grad_residual,
    sum grad_y, sum grad_z * y, sum grad_z), sums in fp32 (fp64 for fp64)."""
    compute = stats_dtype(dtype)
    reduce = (0, 2, 3)
    grad_z = grad_out.to(compute)
    if activation == "relu":  # torch's relu backward: 0 where out <= 0 (a NaN out passes)
        grad_z = torch.where(out <= 0, 0.0, grad_z)
    if y is not None:
        y = y.to(compute)
    grad_y = grad_z if out_scale is None else grad_z * per_channel(out_scale.to(compute))
    if grad_stats is not None:  # d mean/dy = 1/n, d var/dy = 2 (y - mean)/n per channel
        grad_mean, grad_var = grad_stats.to(compute)
        count = y.numel() // y.shape[1]
        centred = y - y.mean(reduce, keepdim=True)
        grad_y = grad_y + per_channel(grad_mean / count) + centred * per_channel(2 * grad_var / count)
    grad_residual = None
    if residual is not None:
        grad_residual = grad_z.to(residual.dtype).contiguous(memory_format=format_of(residual))
    return (grad_y.to(dtype), grad_residual, grad_y.sum(reduce) if need_sum_grad_y else None,
            None if out_scale is None else (grad_z * y).sum(reduce),
            grad_z.sum(reduce) if need_sum_grad_z else None)


def prologue_glue(grad_x_hat, input, in_scale, in_shift, relu):
    """Torch reference of conv_glue.prologue_backward: (grad_input, sum grad_u * x,
    sum grad_u), grad_u = grad_x_hat masked by x s + b > 0 under relu."""
    compute = stats_dtype(input.dtype)
    reduce = (0, 2, 3)
    grad_u = grad_x_hat
    if relu or in_scale is not None or in_shift is not None:
        grad_u = grad_x_hat.to(compute)
    if relu:  # recompute u = x s + b rather than store it
        u = reference_prologue(input.to(compute), *(None if t is None else t.to(compute)
                                                    for t in (in_scale, in_shift)), None)
        grad_u = torch.where(u <= 0, 0.0, grad_u)
    grad_input = grad_u if in_scale is None else grad_u * per_channel(in_scale.to(compute))
    grad_input = grad_input.to(input.dtype).contiguous(memory_format=format_of(input))
    return (grad_input, None if in_scale is None else (grad_u * input.to(compute)).sum(reduce),
            None if in_shift is None else grad_u.sum(reduce))
