# SPDX-License-Identifier: Apache-2.0
"""Block-diagonal grouped 2-D convolution with the semantics of torch.nn.functional.conv2d."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._conventions import stats_dtype
from .._layouts import format_of, with_format_of
from ._autograd import any_requires_grad, library_op, traced, unaliased
from .conv_checks import IntPair, validated_fused_call, validated_grouped_call
from .conv_engines import (AUTO, IMPLEMENTED, NO_EPILOGUE, NO_PROLOGUE, auto_forward_engine,
                           auto_fused_forward_engine, auto_grad_engines, conv_forward, conv_grads,
                           epilogue_hooks, has_epilogue, prologue_hooks, torch_forward,
                           use_triton_glue)
from .conv_reference import epilogue_glue, output_hw, prologue_glue, reference_conv2d_backward

# ---------------------------------------------------------------------------------------------
# grouped_conv2d: custom op + fake + autograd
# ---------------------------------------------------------------------------------------------

@library_op("packed_kernels::grouped_conv2d")
@_backend.on_input_device
def _grouped_conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int], groups: int, backend: str) -> Tensor:
    if backend == AUTO:
        backend = auto_forward_engine(input, weight, bias, stride, padding, dilation, groups)
    out, _, _ = conv_forward(backend, input, weight, bias, stride, padding, dilation, groups)
    return out


@_grouped_conv2d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, backend):
    out_h, out_w = output_hw(input.shape[2:], weight, stride, padding, dilation)
    return torch.empty((input.shape[0], weight.shape[0], out_h, out_w), dtype=input.dtype,
                       device=input.device, memory_format=format_of(input))


@library_op("packed_kernels::grouped_conv2d_backward")
@_backend.on_input_device
def _grouped_conv2d_backward_op(grad: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                groups: int, backend: str, need_input: bool,
                                need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad input, grad weight, grad bias), empty where not needed (need_input, need_weight,
    has_bias): as torch, a gradient nobody asked for is not computed."""
    engines = (backend if need_input else None, backend if need_weight else None)
    if backend == AUTO:
        engines = auto_grad_engines(grad, input, weight, stride, padding, dilation, groups,
                                    NO_PROLOGUE, need_input, need_weight)
    if all(e in ("torch", None) for e in engines):  # one cuDNN call, with the bias gradient
        grads = reference_conv2d_backward(grad, input, weight, has_bias, stride, padding, dilation,
                                          groups, (need_input, need_weight))
    else:
        grad_input, grad_weight = conv_grads(engines, grad, input, weight, stride, padding,
                                             dilation, groups)
        grads = (grad_input, grad_weight, grad.sum((0, 2, 3)) if has_bias else None)
    return unaliased(grads, (grad, input, weight), input)


@_grouped_conv2d_backward_op.register_fake
def _(grad, input, weight, has_bias, stride, padding, dilation, groups, backend, need_input,
      need_weight):
    return (torch.empty_like(input, memory_format=format_of(input)) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[0] if has_bias else 0))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, backend = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups, backend)


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[:2]
    grad_input, grad_weight, grad_bias = _grouped_conv2d_backward_op(
        grad, input, weight, ctx.has_bias, *ctx.args, need_input, need_weight)
    return (grad_input if need_input else None, grad_weight if need_weight else None,
            grad_bias if ctx.has_bias else None, None, None, None, None, None)


_grouped_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# fused_conv2d: custom op + fake + autograd
# ---------------------------------------------------------------------------------------------

@library_op("packed_kernels::fused_conv2d")
@_backend.on_input_device
def _fused_conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                     in_shift: Optional[Tensor], out_scale: Optional[Tensor],
                     out_shift: Optional[Tensor], residual: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int,
                     in_activation: Optional[str], activation: Optional[str], channel_stats: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, var): the mean and biased variance of the pre-epilogue y per output channel,
    empty when not asked (a custom op returns a fixed structure). Every output is a new
    tensor: none aliases an input."""
    prologue = prologue_hooks(in_scale, in_shift, in_activation)
    epilogue = epilogue_hooks(out_scale, out_shift, residual, activation)
    if backend == AUTO:
        backend = auto_fused_forward_engine(input, weight, bias, stride, padding, dilation, groups,
                                            prologue, epilogue, channel_stats)
    out, mean, var = conv_forward(backend, input, weight, bias, stride, padding, dilation, groups,
                                  prologue, epilogue, channel_stats)
    if not channel_stats:
        dtype = stats_dtype(input.dtype)
        mean, var = input.new_empty(0, dtype=dtype), input.new_empty(0, dtype=dtype)
    return out, mean, var


@_fused_conv2d_op.register_fake
def _(input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, stride, padding,
      dilation, groups, in_activation, activation, channel_stats, backend):
    out_h, out_w = output_hw(input.shape[2:], weight, stride, padding, dilation)
    out = torch.empty((input.shape[0], weight.shape[0], out_h, out_w), dtype=input.dtype,
                       device=input.device, memory_format=format_of(input))
    stats = input.new_empty(weight.shape[0] if channel_stats else 0, dtype=stats_dtype(input.dtype))
    return out, stats, torch.empty_like(stats)


@library_op("packed_kernels::fused_conv2d_backward")
@_backend.on_input_device
def _fused_conv2d_backward_op(
        grad_out: Tensor, grad_stats: Tensor, out: Tensor, input: Tensor,
        weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
        out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        in_activation: Optional[str], activation: Optional[str], channel_stats: bool, backend: str,
        need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (out, mean y, var y) for y = conv(x_hat) + bias, x_hat = act(x s + b),
    out = act(y s' + b' + r). The convolutions run on `backend`; the per-channel glue (masks,
    the stats gradient, per-channel sums) runs as two fused Triton passes on CUDA tensors when
    Triton is usable (whatever the conv backend), else in torch (epilogue_glue/prologue_glue).
    Returns (input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual) grads,
    empty where that argument was None."""
    epilogue = has_epilogue(out_scale, out_shift, residual, activation)
    prologue = prologue_hooks(in_scale, in_shift, in_activation)
    forward_backend = backend
    if backend == AUTO:  # the forward's decision, to recompute y as the forward computed it
        forward_backend = auto_fused_forward_engine(
            input, weight, bias, stride, padding, dilation, groups, prologue,
            epilogue_hooks(out_scale, out_shift, residual, activation), channel_stats)
    triton_glue = use_triton_glue(input)
    y = mean_y = None
    if out_scale is not None or channel_stats:
        if epilogue:  # recompute the pre-epilogue output rather than keep it alive
            # the kernel backends fuse y's statistics into the conv: the Triton glue's centring
            # mean then costs no extra pass over y
            fused_mean = triton_glue and channel_stats and forward_backend != "torch"
            y, mean_y, _ = conv_forward(forward_backend, input, weight, bias, stride, padding,
                                         dilation, groups, prologue, channel_stats=fused_mean)
        else:
            y = out
    if triton_glue:
        from ..triton import conv_glue
        grad_y_conv, grad_residual, sum_grad_y, sum_grad_zy, sum_grad_z = conv_glue.epilogue_backward(
            grad_out, out, y, out_scale, grad_stats if channel_stats else None, residual,
            activation == "relu", need_sums=bias is not None or out_shift is not None, mean=mean_y)
    else:
        grad_y_conv, grad_residual, sum_grad_y, sum_grad_zy, sum_grad_z = epilogue_glue(
            grad_out, out, y, out_scale, grad_stats if channel_stats else None, residual,
            activation, input.dtype, bias is not None, out_shift is not None)
    geometry = (stride, padding, dilation, groups)
    if backend == AUTO:
        engines = auto_grad_engines(grad_y_conv, input, weight, *geometry, prologue, need_input,
                                    need_weight)
    else:
        engines = (backend if need_input else None, backend if need_weight else None)
    grad_x_hat, grad_weight = conv_grads(engines, grad_y_conv, input, weight, *geometry, prologue)

    grad_input = sum_grad_ux = sum_grad_u = None
    if grad_x_hat is not None:
        glue = conv_glue.prologue_backward if triton_glue else prologue_glue
        grad_input, sum_grad_ux, sum_grad_u = glue(grad_x_hat, input, in_scale, in_shift,
                                                   in_activation == "relu")

    def cast(total, like):
        return None if like is None or total is None else total.to(like.dtype)

    grads = (grad_input, grad_weight, cast(sum_grad_y, bias), cast(sum_grad_ux, in_scale),
             cast(sum_grad_u, in_shift), cast(sum_grad_zy, out_scale), cast(sum_grad_z, out_shift),
             grad_residual)
    return unaliased(grads, (grad_out, grad_stats, out, input, weight, bias, in_scale,
                             in_shift, out_scale, out_shift, residual), input)


@_fused_conv2d_backward_op.register_fake
def _(grad_out, grad_stats, out, input, weight, bias, in_scale, in_shift, out_scale,
      out_shift, residual, stride, padding, dilation, groups, in_activation, activation,
      channel_stats, backend, need_input, need_weight):
    def like(t, needed=True, fmt=torch.preserve_format):
        return torch.empty_like(t, memory_format=fmt) if t is not None and needed else input.new_empty(0)
    return (like(input, need_input, format_of(input)), like(weight, need_weight), like(bias),
            like(in_scale, need_input), like(in_shift, need_input), like(out_scale), like(out_shift),
            like(residual, True, format_of(residual) if residual is not None else None))


def _fused_setup_context(ctx, inputs, output):
    (input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, stride, padding,
     dilation, groups, in_activation, activation, channel_stats, backend) = inputs
    ctx.save_for_backward(output[0], input, weight, bias, in_scale, in_shift, out_scale, out_shift,
                          residual)
    ctx.args = (stride, padding, dilation, groups, in_activation, activation, channel_stats, backend)


def _fused_backward(ctx, grad_out, grad_mean, grad_var):
    out, input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual = ctx.saved_tensors
    channels = weight.shape[0]
    dtype = stats_dtype(input.dtype)
    channel_stats = ctx.args[6]
    # Autograd passes None for outputs that got no gradient: they contribute zero.
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if not channel_stats:
        grad_stats = out.new_zeros((0, channels), dtype=dtype)
    else:
        grad_stats = torch.stack([out.new_zeros(channels, dtype=dtype) if g is None else g
                                  for g in (grad_mean, grad_var)])
    grads = _fused_conv2d_backward_op(
        grad_out, grad_stats, out, input, weight, bias, in_scale, in_shift, out_scale,
        out_shift, residual, *ctx.args, need_input=bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
                                                      or ctx.needs_input_grad[4]),
        need_weight=bool(ctx.needs_input_grad[1]))
    present = (input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual)
    result = [g if t is not None and g.numel() > 0 else None for g, t in zip(grads, present)]
    return (*result, None, None, None, None, None, None, None, None)


_fused_conv2d_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ---------------------------------------------------------------------------------------------
# backend choice and public functions
# ---------------------------------------------------------------------------------------------

def choose_backend(op: str, backend: Optional[str], input: Tensor, weight: Tensor, stride, groups: int) -> str:
    """backend=None/"auto": "auto" on CUDA tensors (the op measures the engines on first use of
    each kind of call and keeps the fastest that agrees with cuDNN; see packed_kernels.dispatch),
    the torch reference elsewhere; explicit backends as asked. An empty batch has nothing to
    compute: torch answers it, with its empty output and gradients."""
    if input.shape[0] == 0:
        if not (backend is None or backend == AUTO or backend in _backend.BACKENDS):
            _backend.resolve(op, backend, input.device, input.dtype, IMPLEMENTED)  # names the bad value
        return "torch"
    if backend is None or backend == AUTO:
        return AUTO if input.is_cuda else "torch"
    return _backend.resolve(op, backend, input.device, input.dtype, IMPLEMENTED)


def _channels_last_for_kernels(input: Tensor, chosen: str):
    """(input, caller's format or None): an explicitly chosen kernel engine reads channels_last,
    so an NCHW or strided input is converted here, once; the op then saves that copy for its
    backward (whose passes would each convert the input again), and the output goes back to the
    caller's format. backend "auto" measures each engine with its own copies instead."""
    if chosen == "torch" or chosen == AUTO:
        return input, None
    fmt = format_of(input)
    if fmt == torch.channels_last:
        return input, None
    return input.contiguous(memory_format=torch.channels_last), fmt


def grouped_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                   padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
                   backend: Optional[str] = None) -> Tensor:
    """torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups):
    the 2-D convolution, block-diagonal over `groups` (the layer of a Packed-Ensemble).
    Differentiable in input, weight and bias; torch.compile and torch.export see it as the op
    packed_kernels::grouped_conv2d (packed_kernels.export decomposes it into aten).

    Args:
        input: (N, C_in, H, W), float32, float16, bfloat16 (kernel backends) or any float dtype
            ("torch"); contiguous (NCHW), channels_last or any strided view. N may be 0.
        weight: (C_out, C_in / groups, kH, kW), input's dtype and device.
        bias: (C_out,) in input's dtype, or None.
        stride: an int or (sH, sW), each >= 1.
        padding: an int or (pH, pW) >= 0 of zeros on each side, or "valid" (0) or "same"
            (output size = input size; stride 1 only; an even kernel pads one more row/column
            at the bottom/right, as torch does).
        dilation: an int or (dH, dW), each >= 1.
        groups: >= 1, dividing both C_in and C_out.
        backend: the engine: None or "auto" (CUDA tensors: each engine is measured on the
            first call of each kind and the fastest that agrees with cuDNN is kept, see
            packed_kernels.dispatch; other devices: "torch"), or one of packed_kernels.BACKENDS:
            "torch" (torch's conv2d), "triton", "cuda" (CUDA tensors), "simt" (the CUDA C++
            kernels on the CPU emulator, CPU tensors). A backend that cannot run the call
            raises BackendUnavailableError before any launch; available_backends() lists those
            that can. Every backend computes the same function (up to rounding).

    Returns:
        (N, C_out, H_out, W_out) in input's dtype and memory format (channels_last in,
        channels_last out), H_out = (H + 2 pH - dH (kH - 1) - 1) // sH + 1 (W likewise).

    Raises:
        TypeError, ValueError naming the argument (shapes, dtypes, devices, geometry),
        BackendUnavailableError; all before any launch."""
    op = "grouped_conv2d"
    eager = not traced()
    stride, padding4, dilation, torch_conv = validated_grouped_call(
        eager, input, weight, bias, stride, padding, dilation, groups)
    if backend is None and torch_conv is not None and eager:  # the CPU's default, "torch":
        # torch's conv and its own autograd, nothing to add (choose_backend's answer and
        # reference_conv2d, inlined)
        torch_stride, torch_padding, torch_dilation = torch_conv
        return with_format_of(F.conv2d(input, weight, bias, torch_stride, torch_padding,
                                       torch_dilation, groups), input)
    chosen = choose_backend(op, backend, input, weight, stride, groups)
    if chosen == "torch" and eager:
        return torch_forward(input, weight, bias, stride, padding4, dilation, groups,
                             NO_PROLOGUE, NO_EPILOGUE, False)[0]
    input, caller_format = _channels_last_for_kernels(input, chosen)
    out = _grouped_conv2d_op(input, weight, bias, stride, padding4, dilation, groups, chosen)
    return out if caller_format is None else out.contiguous(memory_format=caller_format)


def fused_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                 padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
                 in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
                 in_activation: Optional[str] = None, out_scale: Optional[Tensor] = None,
                 out_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 activation: Optional[str] = None, channel_stats: bool = False,
                 backend: Optional[str] = None):
    """out = act(y * out_scale + out_shift + residual), y = conv2d(x_hat, weight, bias, ...),
    x_hat = in_act(input * in_scale + in_shift) (per channel; the conv zero-pads x_hat, so
    this is conv(relu(bn(x))) with BN folded into in_scale/in_shift).

    Args:
        input, weight, bias, stride, padding, dilation, groups: as grouped_conv2d's (input
            (N, C_in, H, W), weight (C_out, C_in / groups, kH, kW), bias (C_out,) or None).
        in_scale, in_shift: (C_in,) per input channel, or None (1 and 0): the prologue, e.g.
            the previous BatchNorm folded (scale = gamma / sqrt(var + eps), shift = beta -
            mean * scale). input's dtype, or float32 with float16/bfloat16 input.
        in_activation: None or "relu", applied after the prologue.
        out_scale, out_shift: (C_out,) per output channel, or None: the epilogue (this conv's
            BatchNorm folded); dtypes as in_scale's.
        residual: a tensor of the output's shape and input's dtype added after the epilogue's
            scale and shift (the block's shortcut), or None.
        activation: None or "relu", applied last.
        channel_stats: also return the statistics of y (see Returns).
        backend: the engine: None or "auto" (CUDA tensors: each engine is measured on the
            first call of each kind and the fastest that agrees with cuDNN is kept, see
            packed_kernels.dispatch; other devices: "torch"), or one of packed_kernels.BACKENDS:
            "torch" (the torch reference), "triton", "cuda" (CUDA tensors), "simt" (the CUDA C++
            kernels on the CPU emulator, CPU tensors). A backend that cannot run the call
            raises BackendUnavailableError before any launch; available_backends() lists those
            that can. Every backend computes the same function (up to rounding).

    Returns `out`, or with channel_stats=True `(out, mean, var)`: per output channel, the mean
    and biased (population) variance of y over (N, H, W) in fp32 (fp64 for fp64 input) —
    BatchNorm's batch statistics of y without reading it again, computed stably (per-tile
    two-pass M2 merged with Chan's formula; no E[y^2] - mean^2 cancellation when
    |mean| >> std). Differentiable in every tensor argument: the backward runs the conv
    gradients on the same backend, and the per-channel glue (activation masks, the statistics'
    gradient, grad_residual, grad_input, the vectors' gradients) as two fused Triton passes on
    CUDA tensors (triton/conv_glue.py), in torch on the CPU.

    Raises:
        TypeError, ValueError naming the argument, BackendUnavailableError; before any
        launch."""
    eager = not traced()
    stride, padding4, dilation = validated_fused_call(
        eager, input, weight, bias, stride, padding, dilation, groups, in_scale, in_shift,
        in_activation, out_scale, out_shift, residual, activation, channel_stats)
    chosen = choose_backend("fused_conv2d", backend, input, weight, stride, groups)
    if chosen == "torch" and eager and not (torch.is_grad_enabled() and any_requires_grad(
            input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual)):
        # nothing to differentiate: the reference's own ops (the op's backward saves less)
        out, mean, var = torch_forward(input, weight, bias, stride, padding4, dilation, groups,
                                       prologue_hooks(in_scale, in_shift, in_activation),
                                       epilogue_hooks(out_scale, out_shift, residual, activation),
                                       channel_stats)
        return (out, mean, var) if channel_stats else out
    input, caller_format = _channels_last_for_kernels(input, chosen)
    out, mean, var = _fused_conv2d_op(
        input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, stride, padding4,
        dilation, groups, in_activation, activation, channel_stats, chosen)
    if caller_format is not None:
        out = out.contiguous(memory_format=caller_format)
    return (out, mean, var) if channel_stats else out


