# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for batch norm (+ residual + ReLU): training and eval, forward and backward.

Every tensor is seen as (N, C, S) with the spatial dims flattened into S:
  NCHW (contiguous)   -> offsets n*C*S + c*S + s    (stride_n = C*S, stride_c = S)
  channels_last / 2-D -> (N*S, C, 1): offsets r*C + c (stride_n = C,   stride_c = 1)
A program owns a [BLOCK_N, BLOCK_C, BLOCK_S] tile; the launcher picks the block shape so that
the contiguous axis (S for NCHW, C otherwise) is the wide one.

Training forward is three launches: per-split partial (count, mean, M2) by Chan's merge of
tile-local two-pass statistics of x minus the channel's first value (stable for |mean| >> std,
all fp32), a finalize that merges the
splits per channel, and one elementwise pass (normalise, + residual, ReLU). Backward is a
reduction pass (sum g, sum g*x_hat per split) and one elementwise pass; the ReLU mask is read
from the saved output (out <= 0 exactly when the pre-activation is <= 0; NaN passes, as in
torch's relu backward).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _alloc, _backend

TILE = 4096  # elements per [BLOCK_N, BLOCK_C, BLOCK_S] tile
NUM_WARPS = 8  # elementwise kernels: 16 elements per thread
REDUCE_WARPS = 4  # reduction loops keep more alive per element; 8 warps spill on sm_80 fp16
CHANNEL_BLOCKS = (8, 64)  # BLOCK_C when channels are the contiguous axis (channels_last, 2-D)
SPATIAL_BLOCKS = (64, 256, 1024)  # BLOCK_S for NCHW: 7x7/8x8, 14x14/16x16, larger maps
FINALIZE_BLOCK_C = 64
FINALIZE_BLOCK_SPLIT = 32
MAX_SPLITS = 1024


@triton.jit
def reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of reduction tile t (n-block major, s-block minor) in channel block cb,
    plus the number of valid (n, s) elements per channel."""
    nb = t // num_sb
    sb = t % num_sb
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    offsets = (offs_n[:, None, None].to(tl.int64) * stride_n
               + offs_c[None, :, None].to(tl.int64) * stride_c + offs_s[None, None, :])
    mask = (offs_n < N)[:, None, None] & (offs_c < C)[None, :, None] & (offs_s < S)[None, None, :]
    count = tl.minimum(N - nb * BLOCK_N, BLOCK_N) * tl.minimum(S - sb * BLOCK_S, BLOCK_S)
    return offsets, mask, offs_c, count


@triton.jit
def channel_sum(x):
    """Per-channel sum of a [BLOCK_N, BLOCK_C, BLOCK_S] tile."""
    return tl.sum(tl.sum(x, 2), 0)


@triton.jit
def _shift(x_ptr, offs_c, stride_c, valid):
    """The channel's first value, or 0 when it is not finite (x - inf would turn the other
    values' sums into NaN where torch's mean is inf)."""
    first = tl.load(x_ptr + offs_c.to(tl.int64) * stride_c, mask=valid, other=0.0).to(tl.float32)
    return tl.where(tl.abs(first) < float("inf"), first, 0.0)


@triton.jit
def _stats_kernel(x_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr,
                  N, C, S, stride_n, stride_c, num_sb, num_tiles, tiles_per_split,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per split: (count, mean - shift, M2) per channel, shift = the channel's first value, so
    the sums see x - shift (small when |mean| >> std; exact for nearby values)."""
    split = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = offs_c < C
    shift = _shift(x_ptr, offs_c, stride_c, valid)
    count = 0.0
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    for t in range(t_begin, t_end):
        offsets, mask, _, tile_count = reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                                                      BLOCK_N, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :, None], 0.0)
        n_b = tile_count.to(tl.float32)
        mean_b = channel_sum(x) / n_b
        centred = tl.where(mask, x - mean_b[None, :, None], 0.0)
        m2_b = channel_sum(centred * centred)
        # Chan et al.: merge (count, mean, m2) with the tile's (n_b, mean_b, m2_b)
        total = count + n_b
        delta = mean_b - mean
        m2 = m2 + m2_b + delta * delta * (count * n_b / total)
        # count-weighted: an inf tile mean stays inf (mean + delta * n_b / total turns it NaN
        # at the next finite tile, where torch's mean is inf)
        mean = (count * mean + n_b * mean_b) / total
        count = total
    base = split * C + offs_c
    tl.store(part_count_ptr + base, tl.zeros([BLOCK_C], tl.float32) + count, mask=valid)
    tl.store(part_mean_ptr + base, mean, mask=valid)
    tl.store(part_m2_ptr + base, m2, mask=valid)


@triton.jit
def _finalize_kernel(x_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, invstd_ptr,
                     C, stride_c, num_splits, eps, BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the splits' (count, shifted mean, M2): the count-weighted mean first, then
    M2 = sum M2_i + sum n_i (mean_i - mean)^2 (deviations from the final mean: no cancellation)."""
    cb = tl.program_id(0)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    total = tl.zeros([BLOCK_C], tl.float32)
    weighted = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, num_splits, BLOCK_SPLIT):
        offs_s = s0 + tl.arange(0, BLOCK_SPLIT)
        mask = (offs_s < num_splits)[:, None] & valid_c[None, :]
        idx = offs_s[:, None] * C + offs_c[None, :]
        n_i = tl.load(part_count_ptr + idx, mask=mask, other=0.0)
        total += tl.sum(n_i, 0)
        weighted += tl.sum(n_i * tl.load(part_mean_ptr + idx, mask=mask, other=0.0), 0)
    total = tl.where(valid_c, total, 2.0)  # padded channels: finite garbage, never stored
    mean = weighted / total
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, num_splits, BLOCK_SPLIT):
        offs_s = s0 + tl.arange(0, BLOCK_SPLIT)
        mask = (offs_s < num_splits)[:, None] & valid_c[None, :]
        idx = offs_s[:, None] * C + offs_c[None, :]
        n_i = tl.load(part_count_ptr + idx, mask=mask, other=0.0)
        d = tl.load(part_mean_ptr + idx, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(part_m2_ptr + idx, mask=mask, other=0.0) + n_i * d * d, 0)
    shift = _shift(x_ptr, offs_c, stride_c, valid_c)
    tl.store(mean_ptr + offs_c, shift + mean, mask=valid_c)
    tl.store(var_ptr + offs_c, m2 / (total - 1.0), mask=valid_c)  # unbiased, for running_var
    tl.store(invstd_ptr + offs_c, 1.0 / tl.sqrt(m2 / total + eps), mask=valid_c)


@triton.jit
def _channel_affine(mean_ptr, spread_ptr, weight_ptr, bias_ptr, offs_c, C, eps,
                    SPREAD_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per channel: mean, invstd and gamma*invstd, beta (spread is invstd, or a variance in eval)."""
    valid = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=valid, other=0.0).to(tl.float32)
    spread = tl.load(spread_ptr + offs_c, mask=valid, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(spread + eps) if SPREAD_IS_VAR else spread
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs_c, mask=valid, other=1.0).to(tl.float32)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + offs_c, mask=valid, other=0.0).to(tl.float32)
    return mean, invstd, scale, shift


@triton.jit
def _normalize_kernel(x_ptr, res_ptr, out_ptr, mean_ptr, spread_ptr, weight_ptr, bias_ptr,
                      N, C, S, stride_n, stride_c, num_sb, eps,
                      SPREAD_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    t = tl.program_id(0)
    cb = tl.program_id(1)
    offsets, mask, offs_c, _ = reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                                              BLOCK_N, BLOCK_C, BLOCK_S)
    mean, _, scale, shift = _channel_affine(mean_ptr, spread_ptr, weight_ptr, bias_ptr, offs_c, C, eps,
                                            SPREAD_IS_VAR, HAS_WEIGHT, HAS_BIAS)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) first: x * scale + (beta - mean * scale) would cancel when |mean| >> std
    y = (x - mean[None, :, None]) * scale[None, :, None] + shift[None, :, None]
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(grad_ptr, out_ptr, offsets, mask, RELU: tl.constexpr, MASK_STORED: tl.constexpr):
    """torch's relu backward: 0 where the output is <= 0, the gradient elsewhere (NaN too), in
    fp32. MASK_STORED masks before widening: the same values, and the register allocation that
    keeps the reduction kernel from spilling (the elementwise one spills that way instead)."""
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    if not MASK_STORED:
        g = g.to(tl.float32)
    if RELU:
        g = tl.where(tl.load(out_ptr + offsets, mask=mask, other=0.0) <= 0, tl.zeros_like(g), g)
    return g.to(tl.float32)


@triton.jit
def _backward_reduce_kernel(grad_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, part_g_ptr, part_gx_ptr,
                            N, C, S, stride_n, stride_c, num_sb, num_tiles, tiles_per_split,
                            RELU: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per split and channel: sum g and sum g * x_hat (g: the gradient behind the ReLU)."""
    split = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=valid, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=valid, other=0.0)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    for t in range(t_begin, t_end):
        offsets, mask, _, _ = reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                                             BLOCK_N, BLOCK_C, BLOCK_S)
        g = _masked_grad(grad_ptr, out_ptr, offsets, mask, RELU, MASK_STORED=True)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x_hat = (x - mean[None, :, None]) * invstd[None, :, None]
        sum_g += channel_sum(g)
        sum_gx += channel_sum(g * x_hat)
    tl.store(part_g_ptr + split * C + offs_c, sum_g, mask=valid)
    tl.store(part_gx_ptr + split * C + offs_c, sum_gx, mask=valid)


@triton.jit
def _backward_elementwise_kernel(grad_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, weight_ptr,
                                 sum_g_ptr, sum_gx_ptr, grad_x_ptr, grad_res_ptr,
                                 N, C, S, stride_n, stride_c, num_sb, inv_count,
                                 TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                 HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # training: dx = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat));  eval: gamma * invstd * g
    t = tl.program_id(0)
    cb = tl.program_id(1)
    offsets, mask, offs_c, _ = reduction_tile(t, cb, N, C, S, stride_n, stride_c, num_sb,
                                              BLOCK_N, BLOCK_C, BLOCK_S)
    mean, invstd, scale, _ = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, weight_ptr, offs_c, C,
                                             0.0, False, HAS_WEIGHT, False)
    g = _masked_grad(grad_ptr, out_ptr, offsets, mask, RELU, MASK_STORED=False)
    if HAS_RESIDUAL:
        tl.store(grad_res_ptr + offsets, g.to(grad_res_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        valid = offs_c < C
        mean_g = tl.load(sum_g_ptr + offs_c, mask=valid, other=0.0) * inv_count
        mean_gx = tl.load(sum_gx_ptr + offs_c, mask=valid, other=0.0) * inv_count
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x_hat = (x - mean[None, :, None]) * invstd[None, :, None]
        g = g - mean_g[None, :, None] - x_hat * mean_gx[None, :, None]
    tl.store(grad_x_ptr + offsets, (g * scale[None, :, None]).to(grad_x_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

class _Layout:
    """The (N, C, S) view of a contiguous or channels_last tensor, and the tile shape for it."""

    def __init__(self, x: torch.Tensor):
        n, c = x.shape[0], x.shape[1]
        s = x[0, 0].numel()
        if x.is_contiguous():
            self.memory_format = torch.contiguous_format
            self.n, self.c, self.s, self.stride_n, self.stride_c = n, c, s, c * s, s
        else:  # channels_last(_3d): rows of C contiguous channels
            self.memory_format = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            self.n, self.c, self.s, self.stride_n, self.stride_c = n * s, c, 1, c, 1
        self.block_n, self.block_c, self.block_s = blocks(self.n, self.c, self.s)
        self.num_sb = triton.cdiv(self.s, self.block_s)
        self.num_tiles = triton.cdiv(self.n, self.block_n) * self.num_sb
        self.num_cb = triton.cdiv(self.c, self.block_c)

    def args(self):
        return self.n, self.c, self.s, self.stride_n, self.stride_c, self.num_sb

    def tile(self):
        return dict(BLOCK_N=self.block_n, BLOCK_C=self.block_c, BLOCK_S=self.block_s)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """t in this layout (a copy only when its strides differ)."""
        return t.contiguous(memory_format=self.memory_format)

    def splits(self, device: torch.device):
        """Programs along the reduction: enough to fill the GPU, each over whole tiles."""
        if device.type == "cuda":
            target = 4 * _backend.multiprocessors(device)
        else:
            target = 4  # the interpreter: few programs, but still exercise the merge
        splits = max(1, min(self.num_tiles, MAX_SPLITS, triton.cdiv(target, self.num_cb)))
        tiles_per_split = triton.cdiv(self.num_tiles, splits)
        return triton.cdiv(self.num_tiles, tiles_per_split), tiles_per_split


def blocks(n: int, c: int, s: int):
    """(BLOCK_N, BLOCK_C, BLOCK_S): the contiguous axis wide, TILE elements. Few shapes (each is
    compiled for every target): padded lanes are masked, so they cost no memory traffic."""
    if s == 1:
        block_c = next(b for b in CHANNEL_BLOCKS if b >= min(c, CHANNEL_BLOCKS[-1]))
        return TILE // block_c, block_c, 1
    block_s = next(b for b in SPATIAL_BLOCKS if b >= min(s, SPATIAL_BLOCKS[-1]))
    return TILE // block_s, 1, block_s


def nsc_layout(input: torch.Tensor):
    """(input, its (N, C, S) layout), input copied to contiguous when neither dense format."""
    if not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last)
            or input.is_contiguous(memory_format=torch.channels_last_3d)):
        input = input.contiguous()
    return input, _Layout(input)


def _dense(vector: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel vectors are read with stride 1: a strided view or an expanded tensor is copied."""
    return None if vector is None else vector.contiguous()


def forward(input, running_mean, running_var, weight, bias, residual, training: bool, eps: float,
            relu: bool):
    """(out, batch mean, unbiased batch var, invstd); the statistics are empty in eval mode."""
    running_mean, running_var, weight, bias = map(_dense, (running_mean, running_var, weight, bias))
    x, layout = nsc_layout(input)
    out = _alloc.empty_like(x)
    c = layout.c
    if training:
        splits, tiles_per_split = layout.splits(x.device)
        parts = [_alloc.empty((splits, c), x, torch.float32) for _ in range(3)]
        _stats_kernel[(splits, layout.num_cb)](x, *parts, *layout.args(), layout.num_tiles,
                                               tiles_per_split, **layout.tile(), num_warps=REDUCE_WARPS)
        mean, var, invstd = (_alloc.empty((c,), x, torch.float32) for _ in range(3))
        _finalize_kernel[(triton.cdiv(c, FINALIZE_BLOCK_C),)](
            x, *parts, mean, var, invstd, c, layout.stride_c, splits, eps,
            BLOCK_SPLIT=FINALIZE_BLOCK_SPLIT, BLOCK_C=FINALIZE_BLOCK_C)
        centre, spread = mean, invstd
    else:
        centre, spread = running_mean, running_var
        mean, var, invstd = (x.new_empty(0, dtype=torch.float32) for _ in range(3))
    res = layout.like(residual) if residual is not None else x
    _normalize_kernel[(layout.num_tiles, layout.num_cb)](
        x, res, out, centre, spread, weight if weight is not None else x,
        bias if bias is not None else x, *layout.args(), eps,
        SPREAD_IS_VAR=not training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=relu, **layout.tile(), num_warps=NUM_WARPS)
    return out, mean, var, invstd


def backward(grad, input, output, mean, invstd, weight, has_residual: bool, training: bool,
             relu: bool):
    """(grad_input, sum g * x_hat = grad_weight, sum g = grad_bias, grad_residual or empty);
    `mean`/`invstd` are fp32 per channel (batch statistics in training, running ones in eval)."""
    mean, invstd, weight = map(_dense, (mean, invstd, weight))
    x, layout = nsc_layout(input)
    grad = layout.like(grad)
    out = layout.like(output) if relu else x
    c = layout.c
    splits, tiles_per_split = layout.splits(x.device)
    part_g, part_gx = (_alloc.empty((splits, c), x, torch.float32) for _ in range(2))
    _backward_reduce_kernel[(splits, layout.num_cb)](
        grad, x, out, mean, invstd, part_g, part_gx, *layout.args(), layout.num_tiles,
        tiles_per_split, RELU=relu, **layout.tile(), num_warps=REDUCE_WARPS)
    sum_g, sum_gx = part_g.sum(0), part_gx.sum(0)
    grad_input = _alloc.empty_like(x)
    grad_residual = _alloc.empty_like(x) if has_residual else x.new_empty(0)
    _backward_elementwise_kernel[(layout.num_tiles, layout.num_cb)](
        grad, x, out, mean, invstd, weight if weight is not None else x, sum_g, sum_gx,
        grad_input, grad_residual if has_residual else grad_input, *layout.args(),
        1.0 / (layout.n * layout.s), TRAINING=training, HAS_WEIGHT=weight is not None,
        HAS_RESIDUAL=has_residual, RELU=relu, **layout.tile(), num_warps=NUM_WARPS)
    return grad_input, sum_gx, sum_g, grad_residual


# ---------------------------------------------------------------------------------------------
# compile-for-target cases
# ---------------------------------------------------------------------------------------------

_FLOAT_SCALARS = ("eps", "inv_count")
_STATS_PTRS = ("part_", "mean_ptr", "var_ptr", "invstd_ptr", "sum_g")  # always fp32


def _signature(kernel, dtype: str, stat_dtype: str = "fp32"):
    from .compile_case import kernel_signature

    def pointer(arg):
        if arg.startswith(_STATS_PTRS):
            return "*fp32"
        return f"*{stat_dtype}" if arg in ("spread_ptr", "weight_ptr", "bias_ptr") else f"*{dtype}"
    return kernel_signature(kernel, pointer, lambda arg: "fp32" if arg in _FLOAT_SCALARS else "i32")


def tile_shapes():
    """Every (BLOCK_N, BLOCK_C, BLOCK_S) the launchers can pick (what compile_cases compiles)."""
    return [blocks(1, c, 1) for c in CHANNEL_BLOCKS] + [blocks(1, 1, b) for b in SPATIAL_BLOCKS]


def compile_cases():
    """Every tile shape the launchers can pick, for each dtype, for the compile-for-target check."""
    from .compile_case import CompileCase

    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        for bn, bc, bs in tile_shapes():
            tile = dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_S=bs)
            tag = f"{dtype},N={bn},C={bc},S={bs}"
            # all options on: the variants with fewer options generate a subset of this code
            cases.append(CompileCase(f"batch_norm.stats[{tag}]", _stats_kernel,
                                     _signature(_stats_kernel, dtype), tile, REDUCE_WARPS))
            cases.append(CompileCase(f"batch_norm.normalize[{tag}]", _normalize_kernel,
                                     _signature(_normalize_kernel, dtype),
                                     dict(tile, SPREAD_IS_VAR=True, HAS_WEIGHT=True, HAS_BIAS=True,
                                          HAS_RESIDUAL=True, RELU=True), NUM_WARPS))
            cases.append(CompileCase(f"batch_norm.backward_reduce[{tag}]", _backward_reduce_kernel,
                                     _signature(_backward_reduce_kernel, dtype), dict(tile, RELU=True),
                                     REDUCE_WARPS))
            cases.append(CompileCase(f"batch_norm.backward_elementwise[{tag}]", _backward_elementwise_kernel,
                                     _signature(_backward_elementwise_kernel, dtype),
                                     dict(tile, TRAINING=True, HAS_WEIGHT=True, HAS_RESIDUAL=True,
                                          RELU=True), NUM_WARPS))
        cases.append(CompileCase(f"batch_norm.finalize[{dtype}]", _finalize_kernel,
                                 _signature(_finalize_kernel, dtype),
                                 dict(BLOCK_SPLIT=FINALIZE_BLOCK_SPLIT, BLOCK_C=FINALIZE_BLOCK_C)))
    return cases
