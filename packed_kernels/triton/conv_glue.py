# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for the per-channel glue of fused_conv2d's backward (ops/conv.py).

For y = conv(x_hat) + bias, x_hat = in_act(x * in_scale + in_shift),
out = act(y * out_scale + out_shift + residual), stats = (mean y, var y):
  epilogue pass (before the conv gradients):
    grad_z = grad_out, 0 where out <= 0 if act is relu (torch's relu backward)
    grad_y = grad_z * out_scale + grad_mean / n + (y - mean) * 2 grad_var / n
    writes grad_y (input dtype: what dgrad/wgrad read) and grad_residual = grad_z, and per split
    and channel sums of grad_y (grad bias), grad_z * y (grad out_scale) and grad_z (grad out_shift)
  prologue pass (after the input-gradient conv):
    grad_u = grad_x_hat, 0 where x * in_scale + in_shift <= 0 if in_act is relu
    writes grad_input = grad_u * in_scale, and per split and channel sums of grad_u * x
    (grad in_scale) and grad_u (grad in_shift)
Each reads every input once and writes every output once, in fp32; the per-split partial sums
are reduced afterwards in a fixed order (deterministic, no atomics). The tensor views, tiles and
splits are batch_norm.py's (the contiguous axis is the wide one for NCHW and channels_last).
The centring mean of y (only with stats) is the recomputing conv's fused statistic when the
caller has it, else one extra per-channel sum pass over y.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._conventions import fp32_vector
from .._layouts import format_of
from .batch_norm import REDUCE_WARPS, channel_sum, nsc_layout, reduction_tile, tile_shapes

# the epilogue pass keeps grad_z, y and grad_y alive per element: 8 warps (16 elements a thread
# in a 4096-element tile) keep it within registers where 4 spill
EPILOGUE_WARPS = 8


@triton.jit
def _channel_vector(ptr, offs_c, C, default, PRESENT: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + offs_c, mask=offs_c < C, other=default).to(tl.float32)
    return tl.zeros_like(offs_c).to(tl.float32) + default


@triton.jit
def _sum_kernel(x_ptr, part_ptr, N, C, S, stride_n, stride_c, num_sb, num_tiles, tiles_per_split,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per split and channel: sum x (fp32)."""
    split = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    for t in range(t_begin, t_end):
        offsets, mask, _, _ = reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                                             BLOCK_N, BLOCK_C, BLOCK_S)
        total += channel_sum(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
    tl.store(part_ptr + split * C + offs_c, total, mask=offs_c < C)


@triton.jit
def _epilogue_grad_kernel(grad_out_ptr, out_ptr, y_ptr, out_scale_ptr, grad_stats_ptr, mean_ptr,
                          grad_y_ptr, grad_res_ptr, part_grad_y_ptr, part_grad_zy_ptr, part_grad_z_ptr,
                          N, C, S, stride_n, stride_c, num_sb, num_tiles, tiles_per_split, inv_count,
                          RELU: tl.constexpr, HAS_SCALE: tl.constexpr, STATS: tl.constexpr,
                          STORE_GRAD_Y: tl.constexpr, STORE_GRAD_Z: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    split = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = offs_c < C
    scale = _channel_vector(out_scale_ptr, offs_c, C, 1.0, HAS_SCALE)
    # d mean/dy = 1/n, d var/dy = 2 (y - mean)/n per channel
    mean_term = _channel_vector(grad_stats_ptr, offs_c, C, 0.0, STATS) * inv_count
    var_term = _channel_vector(grad_stats_ptr + C, offs_c, C, 0.0, STATS) * (2.0 * inv_count)
    mean = _channel_vector(mean_ptr, offs_c, C, 0.0, STATS)
    sum_grad_y = tl.zeros([BLOCK_C], tl.float32)
    sum_grad_zy = tl.zeros([BLOCK_C], tl.float32)
    sum_grad_z = tl.zeros([BLOCK_C], tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    for t in range(t_begin, t_end):
        offsets, mask, _, _ = reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                                             BLOCK_N, BLOCK_C, BLOCK_S)
        grad_z = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:  # as torch's relu backward: 0 where out <= 0 (a NaN output passes the gradient)
            grad_z = tl.where(tl.load(out_ptr + offsets, mask=mask, other=0.0) <= 0, 0.0, grad_z)
        grad_y = grad_z * scale[None, :, None]
        if HAS_SCALE or STATS:
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                sum_grad_zy += channel_sum(grad_z * y)
            if STATS:
                centred = tl.where(mask, y - mean[None, :, None], 0.0)
                grad_y = grad_y + mean_term[None, :, None] + centred * var_term[None, :, None]
                grad_y = tl.where(mask, grad_y, 0.0)
        if STORE_GRAD_Y:
            tl.store(grad_y_ptr + offsets, grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)
        if STORE_GRAD_Z:
            tl.store(grad_res_ptr + offsets, grad_z.to(grad_res_ptr.dtype.element_ty), mask=mask)
        sum_grad_y += channel_sum(grad_y)
        sum_grad_z += channel_sum(grad_z)
    base = split * C + offs_c
    tl.store(part_grad_y_ptr + base, sum_grad_y, mask=valid)
    tl.store(part_grad_z_ptr + base, sum_grad_z, mask=valid)
    if HAS_SCALE:
        tl.store(part_grad_zy_ptr + base, sum_grad_zy, mask=valid)


@triton.jit
def _prologue_grad_kernel(grad_x_hat_ptr, x_ptr, in_scale_ptr, in_shift_ptr, grad_input_ptr,
                          part_grad_ux_ptr, part_grad_u_ptr,
                          N, C, S, stride_n, stride_c, num_sb, num_tiles, tiles_per_split,
                          RELU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                          STORE_GRAD_INPUT: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    split = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = offs_c < C
    scale = _channel_vector(in_scale_ptr, offs_c, C, 1.0, HAS_SCALE)
    shift = _channel_vector(in_shift_ptr, offs_c, C, 0.0, HAS_SHIFT)
    sum_grad_ux = tl.zeros([BLOCK_C], tl.float32)
    sum_grad_u = tl.zeros([BLOCK_C], tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    for t in range(t_begin, t_end):
        offsets, mask, _, _ = reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                                             BLOCK_N, BLOCK_C, BLOCK_S)
        grad_u = tl.load(grad_x_hat_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU or HAS_SCALE:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if RELU:  # recompute u = x s + b rather than store it
                u = x * scale[None, :, None] + shift[None, :, None]
                grad_u = tl.where(u <= 0, 0.0, grad_u)
            if HAS_SCALE:
                sum_grad_ux += channel_sum(grad_u * x)
        if STORE_GRAD_INPUT:
            tl.store(grad_input_ptr + offsets,
                     (grad_u * scale[None, :, None]).to(grad_input_ptr.dtype.element_ty), mask=mask)
        if HAS_SHIFT:
            sum_grad_u += channel_sum(grad_u)
    base = split * C + offs_c
    if HAS_SCALE:
        tl.store(part_grad_ux_ptr + base, sum_grad_ux, mask=valid)
    if HAS_SHIFT:
        tl.store(part_grad_u_ptr + base, sum_grad_u, mask=valid)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _parts(count: int, splits: int, c: int, like: torch.Tensor):
    return [_alloc.empty((splits, c), like, torch.float32) for _ in range(count)]


def channel_mean(y: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of y over (N, H, W) in fp32: per-split sums, reduced in order."""
    y, layout = nsc_layout(y)
    splits, tiles_per_split = layout.splits(y.device)
    (part,) = _parts(1, splits, layout.c, y)
    _sum_kernel[(splits, layout.num_cb)](y, part, *layout.args(), layout.num_tiles, tiles_per_split,
                                         **layout.tile(), num_warps=REDUCE_WARPS)
    return part.sum(0) / (layout.n * layout.s)


def epilogue_backward(grad_out: torch.Tensor, out: torch.Tensor, y: Optional[torch.Tensor],
                      out_scale: Optional[torch.Tensor], grad_stats: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], relu: bool, need_sums: bool,
                      mean: Optional[torch.Tensor] = None):
    """(grad_y, grad_residual or None, sum grad_y, sum grad_z * y or None, sum grad_z or None).

    grad_y has grad_out's dtype and out's memory format, grad_residual the residual's. `y` is
    the pre-epilogue output, needed with out_scale or grad_stats (then (2, C) fp32 gradients of
    mean and biased var of y). need_sums=False (no bias, no out_shift) skips the sums when no
    tensor needs writing either. `mean`: y's per-channel fp32 mean if already known (else one
    sum pass over y computes it)."""
    has_scale, stats = out_scale is not None, grad_stats is not None
    out_scale = fp32_vector(out_scale)
    grad_stats = fp32_vector(grad_stats)
    fmt = format_of(out)
    out = out.contiguous(memory_format=fmt)
    out, layout = nsc_layout(out)
    grad_out = layout.like(grad_out)
    store_grad_y = relu or has_scale or stats  # otherwise grad_y = grad_z = grad_out
    store_grad_z = residual is not None and relu  # otherwise grad_z = grad_out
    if not (store_grad_y or store_grad_z or need_sums):
        return grad_out, (grad_out if residual is not None else None), None, None, None
    if has_scale or stats:
        y = layout.like(y)
    if stats:
        mean = channel_mean(y) if mean is None else fp32_vector(mean)
    splits, tiles_per_split = layout.splits(out.device)
    part_grad_y, part_grad_zy, part_grad_z = _parts(3, splits, layout.c, out)
    grad_y = _alloc.empty_like(out) if store_grad_y else grad_out
    grad_res = (_alloc.empty(out.shape, out, residual.dtype, layout.memory_format)
                if store_grad_z else None)
    _epilogue_grad_kernel[(splits, layout.num_cb)](
        grad_out, out, y if y is not None else out, out_scale if has_scale else out,
        grad_stats if stats else out, mean if stats else out, grad_y,
        grad_res if store_grad_z else grad_y, part_grad_y, part_grad_zy, part_grad_z,
        *layout.args(), layout.num_tiles, tiles_per_split, 1.0 / (layout.n * layout.s),
        RELU=relu, HAS_SCALE=has_scale, STATS=stats, STORE_GRAD_Y=store_grad_y,
        STORE_GRAD_Z=store_grad_z, **layout.tile(), num_warps=EPILOGUE_WARPS)
    if residual is not None:
        grad_res = (grad_res if store_grad_z else grad_out).contiguous(
            memory_format=format_of(residual))
    return (grad_y, grad_res, part_grad_y.sum(0), part_grad_zy.sum(0) if has_scale else None,
            part_grad_z.sum(0))


def prologue_backward(grad_x_hat: torch.Tensor, input: torch.Tensor, in_scale: Optional[torch.Tensor],
                      in_shift: Optional[torch.Tensor], relu: bool):
    """(grad_input, sum grad_u * x or None, sum grad_u or None); grad_input has the input's dtype
    and memory format."""
    has_scale, has_shift = in_scale is not None, in_shift is not None
    in_scale, in_shift = fp32_vector(in_scale), fp32_vector(in_shift)
    fmt = format_of(input)
    if not (relu or has_scale or has_shift):
        return grad_x_hat.contiguous(memory_format=fmt), None, None
    x, layout = nsc_layout(input.contiguous(memory_format=fmt))
    grad_x_hat = layout.like(grad_x_hat)
    store = relu or has_scale  # otherwise grad_input = grad_u = grad_x_hat
    splits, tiles_per_split = layout.splits(x.device)
    part_grad_ux, part_grad_u = _parts(2, splits, layout.c, x)
    grad_input = _alloc.empty_like(x) if store else grad_x_hat
    _prologue_grad_kernel[(splits, layout.num_cb)](
        grad_x_hat, x, in_scale if has_scale else x, in_shift if has_shift else x, grad_input,
        part_grad_ux, part_grad_u, *layout.args(), layout.num_tiles, tiles_per_split,
        RELU=relu, HAS_SCALE=has_scale, HAS_SHIFT=has_shift, STORE_GRAD_INPUT=store,
        **layout.tile(), num_warps=REDUCE_WARPS)
    return (grad_input, part_grad_ux.sum(0) if has_scale else None,
            part_grad_u.sum(0) if has_shift else None)


# ---------------------------------------------------------------------------------------------
# compile-for-target cases
# ---------------------------------------------------------------------------------------------

_FP32_PTRS = ("part_", "grad_stats_ptr", "mean_ptr", "out_scale_ptr", "in_scale_ptr", "in_shift_ptr")


def _signature(kernel, dtype: str):
    """Activations in `dtype`, per-channel vectors and partial sums fp32 (folded BatchNorm)."""
    from .compile_case import kernel_signature

    return kernel_signature(kernel, lambda arg: "*fp32" if arg.startswith(_FP32_PTRS) else f"*{dtype}",
                            lambda arg: "fp32" if arg == "inv_count" else "i32")


def compile_cases():
    """Every tile shape the launchers can pick, for each dtype, all options on (the variants
    with fewer options generate a subset of that code)."""
    from .compile_case import CompileCase

    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        for bn, bc, bs in tile_shapes():
            tile = dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_S=bs)
            tag = f"{dtype},N={bn},C={bc},S={bs}"
            cases.append(CompileCase(f"conv_glue.sum[{tag}]", _sum_kernel,
                                     _signature(_sum_kernel, dtype), tile, REDUCE_WARPS))
            cases.append(CompileCase(f"conv_glue.epilogue_grad[{tag}]", _epilogue_grad_kernel,
                                     _signature(_epilogue_grad_kernel, dtype),
                                     dict(tile, RELU=True, HAS_SCALE=True, STATS=True,
                                          STORE_GRAD_Y=True, STORE_GRAD_Z=True), EPILOGUE_WARPS))
            cases.append(CompileCase(f"conv_glue.prologue_grad[{tag}]", _prologue_grad_kernel,
                                     _signature(_prologue_grad_kernel, dtype),
                                     dict(tile, RELU=True, HAS_SCALE=True, HAS_SHIFT=True,
                                          STORE_GRAD_INPUT=True), REDUCE_WARPS))
    return cases
