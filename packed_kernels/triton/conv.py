# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for block-diagonal grouped 2-D convolution: forward, input-gradient and
weight-gradient as implicit GEMMs, with the group on grid axis 2.

The kernels read activations as NHWC (channel stride 1; the n/h/w strides are free): the
launchers pass channels_last tensors as they are and copy other layouts once (an NCHW caller
gets its output copied back). The weight is re-laid out as (KH, KW, C_in/groups, C_out). Where
every group's channel run starts 16-byte aligned, the kernels say so and Triton emits 16-byte
vector loads (cp.async) and stores; otherwise elements load one by one, and only small tiles fit
the registers (see conv_tuning). Input and output channels are judged apart (VEC, VEC_OUT): the
stem's 3 input channels go one by one while its 128 output channels move as vectors. The GEMM
views, per group g:
  forward      rows = output pixels (n, oh, ow), cols = output channels, K = (kh, kw, c_in)
  input grad   rows = input pixels (n, ih, iw) of one stride phase, cols = input channels,
               K = (the taps that reach that phase, c_out)
  weight grad  rows = output channels,           cols = input channels,  K = output pixels,
               one program column per tap (kh, kw), per run of output positions and per
               split of the images; its K loop steps through images, so its addresses
               advance by one scalar per step (partial sums summed in order: deterministic)
A 1x1 kernel is the same code with a single tap: a grouped GEMM. The forward and input-gradient
K loops are one flat loop over (tap, channel block), so the software pipeline runs across taps;
addresses advance by scalar offsets added to loop-invariant pointer tiles.

Fusion hooks (all constexpr-gated, so the plain conv pays nothing):
  prologue  x_hat = act(x * in_scale[c] + in_shift[c]) while loading; padding stays zero
            after it (padding applies to the transformed activation, as conv(relu(bn(x))));
  epilogue  out = act(y * out_scale[c] + out_shift[c] + residual), y = conv + bias;
  stats     per-output-channel sum of y and M2 (squared deviations from the row block's own
            mean: two passes over the tile in registers) in fp32, written per row block
            (deterministic, no atomics); the launcher merges the blocks into mean and variance
            (Chan's formula, packed_kernels/_tile_stats.py), stable when |mean| >> std.
Accumulation is fp32 (tl.dot); fp32 inputs use TF32 only when the caller allows it.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import _alloc, _backend
from .._conventions import ACTIVATION_CODES
from .._tile_stats import merge_tile_moments
from .._layouts import kernel_weight
from . import conv_tuning
from .conv_tuning import input_precision



@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:  # NaN stays NaN, as torch.relu (the default maximum drops it)
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return x


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bf16 as raw uint16 bits: do it in fp32 there
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _range_mask(start, BLOCK: tl.constexpr, limit, VEC: tl.constexpr):
    """start + arange(BLOCK) < limit. With VEC > 1 the launcher guarantees start and limit are
    multiples of VEC; written per VEC-chunk the mask is visibly uniform over a vector, so
    Triton can vectorise the masked loads."""
    if VEC > 1:
        return (tl.arange(0, BLOCK) // VEC) < (limit - start) // VEC
    return tl.arange(0, BLOCK) < limit - start


@triton.jit
def _channel_mask(start, BLOCK: tl.constexpr, limit, VEC: tl.constexpr, EVEN: tl.constexpr):
    """_range_mask of a K step's channel block; all true (and folded away) where the launcher
    checked that BLOCK divides the channel count."""
    if EVEN:
        return tl.full([BLOCK], 1, tl.int1)
    return _range_mask(start, BLOCK, limit, VEC)


@triton.jit
def _next_k_step(c0, kw, kh, CHANNELS, KW, BLOCK_K: tl.constexpr):
    """The K loop's next (kh, kw, channel block) in that order, by increments and wraps (no
    division): one flat loop over taps and channel blocks pipelines across taps."""
    c0 += BLOCK_K
    next_tap = c0 >= CHANNELS
    c0 = tl.where(next_tap, 0, c0)
    kw += next_tap.to(tl.int32)
    next_row = kw >= KW
    kw = tl.where(next_row, 0, kw)
    kh += next_row.to(tl.int32)
    return c0, kw, kh


@triton.jit
def _prologue(a, ok, in_scale_ptr, in_shift_ptr, chan, chan_ok, HAS_IN_AFFINE: tl.constexpr,
              IN_ACT: tl.constexpr):
    """act(a * in_scale + in_shift) per channel of a loaded [pixels, channels] tile, zero where
    not `ok` (the conv zero-pads the transformed input)."""
    if HAS_IN_AFFINE or IN_ACT != 0:
        u = a.to(tl.float32)
        if HAS_IN_AFFINE:
            scale = tl.load(in_scale_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32)
            shift = tl.load(in_shift_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32)
            u = u * scale[None, :] + shift[None, :]
        u = _activate(u, IN_ACT)
        a = tl.where(ok, u, 0.0).to(a.dtype)
    return a


@triton.jit
def _load_input_at(ptrs, ok, in_scale_ptr, in_shift_ptr, chan, chan_ok,
                   HAS_IN_AFFINE: tl.constexpr, IN_ACT: tl.constexpr):
    """[pixels, channels] tile of the (transformed) NHWC input from a tile of pointers; zero
    where not `ok`. The caller states the pointers' alignment (tl.multiple_of on an argument
    of a jit function is dropped)."""
    return _prologue(tl.load(ptrs, mask=ok, other=0.0), ok, in_scale_ptr, in_shift_ptr, chan,
                     chan_ok, HAS_IN_AFFINE, IN_ACT)


@triton.jit
def _conv_forward_kernel(
        x_ptr, w_ptr, bias_ptr, in_scale_ptr, in_shift_ptr, out_scale_ptr, out_shift_ptr,
        res_ptr, y_ptr, stats_ptr,
        H, W, OH, OW, M, CIN_G, COUT_G, COUT, KH, KW,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sx_n, sx_h, sx_w, sw_i, sw_h, sw_w, sy_n, sy_h, sy_w, sr_n, sr_h, sr_w,
        HAS_BIAS: tl.constexpr, HAS_IN_AFFINE: tl.constexpr, IN_ACT: tl.constexpr,
        HAS_OUT_AFFINE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_ACT: tl.constexpr,
        STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        VEC: tl.constexpr, VEC_OUT: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x: NHWC (channel stride 1); w: (KH, KW, C_in/groups, C_out), C_out contiguous.
    # VEC: x's input-channel runs' vector width (the K axis); VEC_OUT: the output channels' runs
    # in w, the residual and y (the stem's 3 input channels load one by one, its weight rows and
    # 128 output channels as 16-byte vectors).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = rows // (OH * OW)  # one division per index, remainders by multiply-subtract
    rem = rows - n * (OH * OW)
    oh = rem // OW
    ow = rem - oh * OW
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = _range_mask(pid_n * BLOCK_N, BLOCK_N, COUT_G, VEC_OUT)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    first_in = group * CIN_G
    kk = tl.arange(0, BLOCK_K)
    # Loop-invariant pointer tiles: each K step adds one scalar offset per operand.
    row_base = n.to(tl.int64) * sx_n + ih0.to(tl.int64) * sx_h + iw0.to(tl.int64) * sx_w
    x_tile = x_ptr + first_in + row_base[:, None] + kk[None, :]
    w_tile = w_ptr + group * COUT_G + kk[:, None] * sw_i + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One K loop over (tap, channel block): the pipeline runs across taps.
    c0 = 0
    kw = 0
    kh = 0
    for _ in tl.range(0, KH * KW * tl.cdiv(CIN_G, BLOCK_K)):
        dh = kh * dil_h
        dw = kw * dil_w
        pix_ok = row_ok & (ih0 >= -dh) & (ih0 < H - dh) & (iw0 >= -dw) & (iw0 < W - dw)
        k_ok = _channel_mask(c0, BLOCK_K, CIN_G, VEC, EVEN_K)
        ptrs = x_tile + (dh * sx_h + dw * sx_w + c0)
        if VEC > 1:  # the launcher checked: every channel run starts 16-byte aligned (bytes)
            ptrs = tl.multiple_of(ptrs, [1, 16])
        a = _load_input_at(ptrs, pix_ok[:, None] & k_ok[None, :], in_scale_ptr + first_in,
                           in_shift_ptr + first_in, c0 + kk, k_ok, HAS_IN_AFFINE, IN_ACT)
        ptrs = w_tile + (kh * sw_h + kw * sw_w + c0 * sw_i)
        if VEC_OUT > 1:  # the launcher checked: every channel run starts 16-byte aligned (bytes)
            ptrs = tl.multiple_of(ptrs, [1, 16])
        b = tl.load(ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST)
        c0, kw, kh = _next_k_step(c0, kw, kh, CIN_G, KW, BLOCK_K)

    co = group * COUT_G + cols
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if STATS:  # [row block, 2, COUT]: sum and M2 about the block's mean of the pre-epilogue y
        stats_row = stats_ptr + pid_m.to(tl.int64) * 2 * COUT + co
        tile_sum = tl.sum(tl.where(out_ok, y, 0.0), 0)
        tl.store(stats_row, tile_sum, mask=col_ok)
        tile_mean = tile_sum / tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        deviation = tl.where(out_ok, y - tile_mean[None, :], 0.0)  # second pass, in registers
        tl.store(stats_row + COUT, tl.sum(deviation * deviation, 0), mask=col_ok)
    if HAS_OUT_AFFINE:
        y = y * tl.load(out_scale_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y += tl.load(out_shift_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_off = n.to(tl.int64) * sr_n + oh.to(tl.int64) * sr_h + ow.to(tl.int64) * sr_w
        ptrs = res_ptr + r_off[:, None] + co[None, :]
        if VEC_OUT > 1:  # the launcher checked: every channel run starts 16-byte aligned (bytes)
            ptrs = tl.multiple_of(ptrs, [1, 16])
        y += tl.load(ptrs, mask=out_ok, other=0.0).to(tl.float32)
    y = _activate(y, OUT_ACT)
    y_off = n.to(tl.int64) * sy_n + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w
    ptrs = y_ptr + y_off[:, None] + co[None, :]
    if VEC_OUT > 1:  # the launcher checked: every channel run starts 16-byte aligned (bytes)
        ptrs = tl.multiple_of(ptrs, [1, 16])
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _stride_phase(phase, size, pad, KSIZE, dil, stride):
    """Along one axis, the input indices phase + stride * i (i < count) and the taps that reach
    them, kernel index first + t * step (t < taps): those with (phase + pad - k * dil) divisible
    by stride. Through tap t, input index phase + stride * i reads output index
    i + shift - t * shift_step (exact division). A scalar loop over the kernel, once per program."""
    taps = 0
    first = 0
    second = 0
    for k in range(KSIZE):
        hit = (phase + pad - k * dil) % stride == 0
        second = tl.where(hit & (taps == 1), k, second)
        first = tl.where(hit & (taps == 0), k, first)
        taps += hit.to(tl.int32)
    step = tl.where(taps > 1, second - first, 1)
    count = tl.cdiv(size - phase, stride)
    return count, taps, first, step, (phase + pad - first * dil) // stride, step * dil // stride


@triton.jit
def _conv_input_grad_kernel(
        g_ptr, w_ptr, gx_ptr,
        H, W, OH, OW, N, CIN_G, COUT_G, KH, KW, PHASES_W, PHASES,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sg_n, sg_h, sg_w, sw_i, sw_h, sw_w, sx_n, sx_h, sx_w,
        INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, VEC: tl.constexpr,
        VEC_OUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    # VEC: gx's input-channel runs' vector width; VEC_OUT: g's and w's output-channel runs, the K
    # axis (the stem's 3 input channels store one by one while its 128 output channels load as
    # 16-byte vectors).
    # Grid axis 2 is (group, stride phase): a program's input pixels are (phase_h + stride_h * i,
    # phase_w + stride_w * j), and its K loop visits only the taps that reach them (as the CUDA
    # C++ input gradient): for stride 2, a quarter of a 3x3 kernel's taps on average.
    # g, gx: NHWC (channel stride 1); w: (KH, KW, C_in/groups, C_out), C_out contiguous.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2) // PHASES
    phase = tl.program_id(2) % PHASES
    phase_h = phase // PHASES_W
    phase_w = phase % PHASES_W
    HP, taps_h, kh0, kh_step, oh_shift, oh_step = _stride_phase(phase_h, H, pad_h, KH, dil_h, stride_h)
    WP, taps_w, kw0, kw_step, ow_shift, ow_step = _stride_phase(phase_w, W, pad_w, KW, dil_w, stride_w)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * HP * WP  # phases with fewer rows leave their last blocks empty
    n = rows // (HP * WP)
    rem = rows - n * (HP * WP)
    i = rem // WP
    j = rem - i * WP
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    col_ok = _range_mask(pid_n * BLOCK_N, BLOCK_N, CIN_G, VEC)
    first_out = group * COUT_G
    oh0 = i + oh_shift  # output pixel through the first tap; each further tap is a scalar step
    ow0 = j + ow_shift
    kk = tl.arange(0, BLOCK_K)  # output channel within the group
    row_base = n.to(tl.int64) * sg_n + oh0.to(tl.int64) * sg_h + ow0.to(tl.int64) * sg_w
    g_tile = g_ptr + first_out + row_base[:, None] + kk[None, :]
    w_tile = w_ptr + first_out + kk[:, None] + cols[None, :] * sw_i
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One K loop over (contributing tap, channel block); a phase no tap reaches stores zeros.
    c0 = 0
    tw = 0
    th = 0
    for _ in tl.range(0, taps_h * taps_w * tl.cdiv(COUT_G, BLOCK_K)):
        dh = th * oh_step
        dw = tw * ow_step
        pix_ok = row_ok & (oh0 >= dh) & (oh0 < OH + dh) & (ow0 >= dw) & (ow0 < OW + dw)
        k_ok = _channel_mask(c0, BLOCK_K, COUT_G, VEC_OUT, EVEN_K)
        ptrs = g_tile + (c0 - dh * sg_h - dw * sg_w)
        if VEC_OUT > 1:  # the launcher checked: every channel run starts 16-byte aligned (bytes)
            ptrs = tl.multiple_of(ptrs, [1, 16])
        a = tl.load(ptrs, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        ptrs = w_tile + ((kh0 + th * kh_step) * sw_h + (kw0 + tw * kw_step) * sw_w + c0)
        if VEC_OUT > 1:  # the launcher checked: every channel run starts 16-byte aligned (bytes)
            ptrs = tl.multiple_of(ptrs, [16, 1])
        b = tl.load(ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST)
        c0, tw, th = _next_k_step(c0, tw, th, COUT_G, taps_w, BLOCK_K)

    ih = phase_h + i * stride_h
    iw = phase_w + j * stride_w
    x_off = n.to(tl.int64) * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
    ci = group * CIN_G + cols
    ptrs = gx_ptr + x_off[:, None] + ci[None, :]
    if VEC > 1:  # the launcher checked: every channel run starts 16-byte aligned (bytes)
        ptrs = tl.multiple_of(ptrs, [1, 16])
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv_weight_grad_kernel(
        g_ptr, x_ptr, in_scale_ptr, in_shift_ptr, gw_ptr,
        H, W, OH, OW, N, CIN_G, COUT_G, KW, TAPS, SPLITS_N, IMAGES, PLACES, SPLIT_N, FIRST_RUN,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sg_n, sg_h, sg_w, sx_n, sx_h, sx_w, sgw_s, sgw_o, sgw_i, sgw_h, sgw_w,
        HAS_IN_AFFINE: tl.constexpr, IN_ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, VEC: tl.constexpr, VEC_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # g, x: NHWC (channel stride 1); gw: any strides (split, C_out, C_in/groups, KH, KW).
    # VEC: x's channel runs' vector width, VEC_OUT: g's (the stem's 3 input channels load one
    # by one, its 128 output channels' gradient in 16-byte vectors).
    # A K step is IMAGES images x PLACES output positions (oh, ow) of one tap: the outer loop
    # walks the positions, the inner one the images, so the inner loop's addresses are
    # loop-invariant tiles plus one scalar (no per-element index arithmetic in the K loop).
    tiles_n = tl.cdiv(CIN_G, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    tap = tl.program_id(1) % TAPS
    kh = tap // KW
    kw = tap % KW
    split = tl.program_id(1) // TAPS
    split_s = split // SPLITS_N
    split_n = split % SPLITS_N
    group = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel within the group
    row_ok = _range_mask(pid_m * BLOCK_M, BLOCK_M, COUT_G, VEC_OUT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    col_ok = _range_mask(pid_n * BLOCK_N, BLOCK_N, CIN_G, VEC)
    first_in = group * CIN_G
    first_out = group * COUT_G
    if VEC > 1:  # the launcher checked: every channel run starts 16-byte aligned
        first_in = tl.multiple_of(first_in, VEC)
    if VEC_OUT > 1:
        first_out = tl.multiple_of(first_out, VEC_OUT)
    g_group = g_ptr + first_out + rows[:, None]
    x_group = x_ptr + first_in + cols[None, :]
    # K element kk: image kk // PLACES, position kk % PLACES (elements past IMAGES x PLACES idle)
    kk = tl.arange(0, BLOCK_K)
    image = kk // PLACES
    place = kk - image * PLACES
    used = image < IMAGES

    s = (FIRST_RUN + split_s) * PLACES + place
    oh = s // OW
    ow = s - oh * OW
    ih = oh * stride_h - pad_h + kh * dil_h
    iw = ow * stride_w - pad_w + kw * dil_w
    g_ok = used & (s < OH * OW)
    x_ok = g_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    n_begin = split_n * SPLIT_N
    n_end = tl.minimum(n_begin + SPLIT_N, N)
    image64 = image.to(tl.int64) + n_begin
    g_at = image64 * sg_n + oh.to(tl.int64) * sg_h + ow.to(tl.int64) * sg_w
    x_at = image64 * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
    images = tl.full([], IMAGES, tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in tl.range(n_begin, n_end, IMAGES):
        n_ok = image < n_end - n0
        if VEC_OUT > 1:  # the launcher checked: every channel run starts 16-byte aligned
            g_at = tl.multiple_of(g_at, VEC_OUT)
        if VEC > 1:
            x_at = tl.multiple_of(x_at, VEC)
        g_ptrs = g_group + g_at[None, :]
        x_ptrs = x_group + x_at[:, None]
        if VEC_OUT > 1:
            g_ptrs = tl.multiple_of(g_ptrs, [16, 1])
        if VEC > 1:
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
        a = tl.load(g_ptrs, mask=row_ok[:, None] & (g_ok & n_ok)[None, :], other=0.0)
        b = _load_input_at(x_ptrs, (x_ok & n_ok)[:, None] & col_ok[None, :],
                           in_scale_ptr + first_in, in_shift_ptr + first_in, cols, col_ok,
                           HAS_IN_AFFINE, IN_ACT)
        acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST)
        g_at += images * sg_n  # offsets carried, not a loop-invariant tile of pointers
        x_at += images * sx_n

    co = group * COUT_G + rows
    out = (gw_ptr + split.to(tl.int64) * sgw_s + co.to(tl.int64)[:, None] * sgw_o
           + cols.to(tl.int64)[None, :] * sgw_i + kh * sgw_h + kw * sgw_w)
    tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

class Prologue(NamedTuple):
    """Per-input-channel act(x * scale + shift) applied while loading; Nones mean identity."""
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    activation: Optional[str] = None


class Epilogue(NamedTuple):
    """Per-output-channel act(y * scale + shift + residual); Nones mean identity."""
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    activation: Optional[str] = None


def _upcast_dot(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"  # only the interpreter runs on CPU


def _affine(scale, shift, channels, like):
    """Both per-channel vectors, the missing one as the identity; (None, None) if neither."""
    if scale is None and shift is None:
        return None, None
    if scale is None:
        scale = torch.ones(channels, dtype=like.dtype, device=like.device)
    if shift is None:
        shift = torch.zeros(channels, dtype=like.dtype, device=like.device)
    return scale.contiguous(), shift.contiguous()


def _channel_stride_one(t: torch.Tensor) -> torch.Tensor:
    """The kernels read activations with channel stride 1 (NHWC); other layouts are copied
    once here (channels_last input, the fast path, is used as it is)."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _nhw_strides(t: torch.Tensor):
    return t.stride(0), t.stride(2), t.stride(3)


def vector_width(dtype: torch.dtype, channel_counts, tensors) -> int:
    """Elements per 16-byte vector when every channel run of every tensor starts 16-byte
    aligned (the kernels then tell Triton so and it emits vector loads), else 1."""
    vec = 16 // dtype.itemsize
    if any(c % vec for c in channel_counts):
        return 1
    for t, contiguous_dim in tensors:
        if t.data_ptr() % 16:
            return 1
        if any(s % vec for d, s in enumerate(t.stride()) if d != contiguous_dim):
            return 1
    return vec


def output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def _to_format(t: torch.Tensor, memory_format) -> torch.Tensor:
    return t if memory_format == torch.channels_last else t.contiguous(memory_format=memory_format)


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                 memory_format=torch.contiguous_format, prologue: Prologue = Prologue(),
                 epilogue: Epilogue = Epilogue(), channel_stats: bool = False):
    """y = epilogue(conv(prologue(x)) + bias) in `memory_format`; returns (y, mean, var), the
    fp32 per-channel mean and biased variance of the pre-epilogue output (None, None without
    channel_stats)."""
    x = _channel_stride_one(x)
    w_k = kernel_weight(weight, "triton")  # (KH, KW, C_in/groups, C_out)
    bias = None if bias is None else bias.contiguous()  # read with stride 1
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    oh = output_size(h, kh, stride[0], padding[0] + padding[1], dilation[0])
    ow = output_size(w, kw, stride[1], padding[2] + padding[3], dilation[1])
    m = n * oh * ow
    y = _alloc.empty((n, c_out, oh, ow), x, memory_format=torch.channels_last)
    if epilogue.residual is not None:
        epilogue = epilogue._replace(residual=_channel_stride_one(epilogue.residual))
    # the output channels may be 16-byte runs where the input channels are not (the stem); the
    # input channels' vectors are used only with them (the compile-checked pairs)
    outputs = [(w_k, 3), (y, 1)] + ([(epilogue.residual, 1)] if epilogue.residual is not None else [])
    vec_out = vector_width(x.dtype, (cout_g,), outputs)
    vec = vector_width(x.dtype, (cin_g,), [(x, 1)]) if vec_out > 1 else 1
    args = (x, w_k, bias, y, stride, padding, dilation, groups, prologue, epilogue, vec, vec_out)
    config = conv_tuning.pick("forward", x, m, cout_g, cin_g, vec > 1,
                              lambda cfg: _launch_forward(cfg, None, *args), vector_out=vec_out > 1)
    partial = None
    if channel_stats:
        partial = _alloc.empty((triton.cdiv(m, config.block_m), 2, c_out), x, dtype=torch.float32)
    _launch_forward(config, partial, *args)
    y = _to_format(y, memory_format)
    if not channel_stats:
        return y, None, None
    return (y, *merge_tile_moments(partial[:, 0], partial[:, 1], m, config.block_m))


def _launch_forward(config, partial, x, w_k, bias, y, stride, padding, dilation, groups,
                    prologue: Prologue, epilogue: Epilogue, vec: int, vec_out: int):
    n, c_in, h, w = x.shape
    kh, kw, cin_g, c_out = w_k.shape
    cout_g = c_out // groups
    oh, ow = y.shape[2:]
    m = n * oh * ow
    in_scale, in_shift = _affine(prologue.scale, prologue.shift, c_in, x)
    out_scale, out_shift = _affine(epilogue.scale, epilogue.shift, c_out, x)
    residual = epilogue.residual
    dummy = y  # stands in for absent pointers; never dereferenced (constexpr-gated)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(cout_g, config.block_n), groups)
    _conv_forward_kernel[grid](
        x, w_k, dummy if bias is None else bias, dummy if in_scale is None else in_scale,
        dummy if in_shift is None else in_shift, dummy if out_scale is None else out_scale,
        dummy if out_shift is None else out_shift, dummy if residual is None else residual, y,
        dummy if partial is None else partial,
        h, w, oh, ow, m, cin_g, cout_g, c_out, kh, kw,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *_nhw_strides(x), w_k.stride(2), w_k.stride(0), w_k.stride(1), *_nhw_strides(y),
        *(_nhw_strides(residual) if residual is not None else (0, 0, 0)),
        HAS_BIAS=bias is not None, HAS_IN_AFFINE=in_scale is not None,
        IN_ACT=ACTIVATION_CODES[prologue.activation], HAS_OUT_AFFINE=out_scale is not None,
        HAS_RESIDUAL=residual is not None, OUT_ACT=ACTIVATION_CODES[epilogue.activation],
        STATS=partial is not None, INPUT_PRECISION=input_precision(x.dtype), UPCAST=_upcast_dot(x),
        VEC=vec, VEC_OUT=vec_out, EVEN_K=cin_g % config.block_k == 0, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages)


def conv_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int],
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    groups: int, memory_format=torch.contiguous_format) -> torch.Tensor:
    """d loss / d (conv input), the input being the (transformed) activation x_hat."""
    grad = _channel_stride_one(grad)
    w_k = kernel_weight(weight, "triton")  # (KH, KW, C_in/groups, C_out)
    n, c_in, h, w = input_shape
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    grad_input = _alloc.empty((n, c_in, h, w), grad, memory_format=torch.channels_last)
    # the output channels (the K axis) may be 16-byte runs where the input channels are not
    # (the stem); the input channels' vectors are used only with them (the compile-checked pairs)
    vec_out = vector_width(grad.dtype, (cout_g,), [(grad, 1), (w_k, 3)])
    vec = vector_width(grad.dtype, (cin_g,), [(grad_input, 1)]) if vec_out > 1 else 1
    args = (grad, w_k, grad_input, stride, padding, dilation, groups, vec, vec_out)
    config = conv_tuning.pick("input_grad", grad, n * h * w, cin_g, cout_g, vec > 1,
                              lambda cfg: _launch_input_grad(cfg, *args), vector_out=vec_out > 1)
    _launch_input_grad(config, *args)
    return _to_format(grad_input, memory_format)


MAX_GRID_Z = 65535  # CUDA's limit on grid axis z (groups x stride phases in the input gradient)


def _launch_input_grad(config, grad, w_k, grad_input, stride, padding, dilation, groups, vec,
                       vec_out):
    n, c_in, h, w = grad_input.shape
    kh, kw, cin_g, c_out = w_k.shape
    cout_g = c_out // groups
    oh, ow = grad.shape[2:]
    phases_h, phases_w = min(stride[0], h), min(stride[1], w)
    if groups * phases_h * phases_w > MAX_GRID_Z:
        raise ValueError(f"Triton conv input gradient: groups ({groups}) x stride phases "
                         f"({phases_h} x {phases_w}) exceed the grid's {MAX_GRID_Z} on axis z")
    rows = n * triton.cdiv(h, stride[0]) * triton.cdiv(w, stride[1])  # phase (0, 0), the largest
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(cin_g, config.block_n),
            groups * phases_h * phases_w)
    _conv_input_grad_kernel[grid](
        grad, w_k, grad_input, h, w, oh, ow, n, cin_g, cout_g, kh, kw, phases_w,
        phases_h * phases_w, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *_nhw_strides(grad), w_k.stride(2), w_k.stride(0), w_k.stride(1), *_nhw_strides(grad_input),
        INPUT_PRECISION=input_precision(grad.dtype), UPCAST=_upcast_dot(grad), VEC=vec,
        VEC_OUT=vec_out, EVEN_K=cout_g % config.block_k == 0, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages)


def conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     groups: int, prologue: Prologue = Prologue(),
                     memory_format=torch.contiguous_format) -> torch.Tensor:
    """d loss / d weight, reading the input through the prologue (x_hat is never stored), in
    `memory_format` (the weight's: autograd keeps it as the parameter's gradient as it is)."""
    grad = _channel_stride_one(grad)
    x = _channel_stride_one(x)
    c_out, cin_g, kh, kw = weight_shape
    cout_g = c_out // groups
    p = grad.shape[0] * grad.shape[2] * grad.shape[3]
    # the gradient's output channels may be 16-byte runs where the input's are not (the stem);
    # the input's vectors are used only with the gradient's (the compile-checked pairs)
    vec_out = vector_width(x.dtype, (cout_g,), [(grad, 1)])
    vec = vector_width(x.dtype, (cin_g,), [(x, 1)]) if vec_out > 1 else 1
    args = (grad, x, weight_shape, stride, padding, dilation, groups, prologue, vec, vec_out,
            memory_format)
    config = conv_tuning.pick("weight_grad", x, cout_g, cin_g, p, vec > 1,
                              lambda cfg: _launch_weight_grad(cfg, *args), vector_out=vec_out > 1)
    return _launch_weight_grad(config, *args)


class WeightGradSplit(NamedTuple):
    """How the weight gradient's K range (images x output positions) is shared: a program
    takes one run of `places` positions and loops over a run of `split_n` images, `images`
    of them per K step; its partial sum is one slab of the deterministic reduction."""
    images: int
    places: int
    split_n: int
    splits_n: int
    splits_s: int

    @property
    def splits(self) -> int:
        return self.splits_n * self.splits_s


def weight_grad_split(config, weight_shape, groups: int, batch: int, positions: int,
                      activation_bytes: int, device: torch.device) -> WeightGradSplit:
    """Whole images per K step where a map fits in it (small maps), else one image and a run
    of positions, so that a program's K loop only steps through images (its addresses advance
    by one scalar per step). Then the images are split until the GPU is full, each program
    keeping a few K steps to amortise its partial-sum store, and the fp32 slabs' round trip
    (8 bytes per weight element per slab) under PARTIALS_SHARE of the activations' bytes
    (modelled on H100 fp16: a share of 1/4 beats 1/2 and 1/8, and beats filling every SM
    whatever the slabs cost). Where the programs would leave SMs idle and the layer is
    compute-bound (over COMPUTE_BOUND_INTENSITY flops per activation byte: a 3x3 kernel on a
    small map with wide groups), the slab cap gives way to as many splits as still fit one
    program per SM: the tensor cores' time falls by that factor, more than the slabs add."""
    c_out, cin_g, kh, kw = weight_shape
    places = min(positions, config.block_k)
    images = config.block_k // places
    splits_s = triton.cdiv(positions, places)
    image_steps = triton.cdiv(batch, images)
    programs = (triton.cdiv(c_out // groups, config.block_m) * triton.cdiv(cin_g, config.block_n)
                * kh * kw * groups * splits_s)
    sms = _backend.multiprocessors(device)
    slabs = int(PARTIALS_SHARE * activation_bytes) // (8 * c_out * cin_g * kh * kw)
    flops = 2 * batch * positions * c_out * cin_g * kh * kw
    one_wave = sms // programs if flops > COMPUTE_BOUND_INTENSITY * activation_bytes else 0
    wanted = max(1, min(image_steps // 4, math.ceil(2 * sms / programs),
                        max(slabs // splits_s, one_wave)))
    split_n = triton.cdiv(image_steps, wanted) * images
    return WeightGradSplit(images, places, split_n, triton.cdiv(batch, split_n), splits_s)


PARTIALS_SHARE = 0.25  # see weight_grad_split
# flops per activation byte above which idle SMs cost more than extra slabs (modelled on H100
# fp16: 3x3 on 8x8 maps, 576, gains 2.2x; 1x1 layers, 85-205, lose 5-25% to the slabs)
COMPUTE_BOUND_INTENSITY = 256


MAX_GRID_Y = 65535  # CUDA's limit on grid axis y (taps x slabs in the weight gradient)
SLAB_BYTES = 1 << 26  # fp32 slabs per launch beyond the activations' own size


def _launch_weight_grad(config, grad, x, weight_shape, stride, padding, dilation, groups,
                        prologue: Prologue, vec: int, vec_out: int, memory_format):
    c_out, cin_g, kh, kw = weight_shape
    n, c_in, h, w = x.shape
    oh, ow = grad.shape[2:]
    activation_bytes = (x.numel() + grad.numel()) * x.element_size()
    split = weight_grad_split(config, weight_shape, groups, n, oh * ow, activation_bytes, x.device)
    in_scale, in_shift = _affine(prologue.scale, prologue.shift, c_in, x)
    # Large maps have many runs of positions, one slab each: launched a bounded number at a
    # time (the grid's axis y, the slabs' memory), their sums added in order (deterministic).
    slab_bytes = 4 * math.prod(weight_shape) * split.splits_n
    runs = min(split.splits_s, max(1, MAX_GRID_Y // (kh * kw * split.splits_n)),
               max(1, max(activation_bytes, SLAB_BYTES) // slab_bytes))
    total = None
    for first_run in range(0, split.splits_s, runs):
        slabs = min(runs, split.splits_s - first_run) * split.splits_n
        if split.splits == 1:  # one program column per tap: the result itself
            out = _weight_slabs(1, weight_shape, x, x.dtype, memory_format)
        else:  # fp32 partial sums, one slab per program column, summed below
            out = _weight_slabs(slabs, weight_shape, x, torch.float32, memory_format)
        grid = (triton.cdiv(c_out // groups, config.block_m) * triton.cdiv(cin_g, config.block_n),
                kh * kw * slabs, groups)
        _conv_weight_grad_kernel[grid](
            grad, x, out if in_scale is None else in_scale, out if in_shift is None else in_shift,
            out, h, w, oh, ow, n, cin_g, c_out // groups, kw, kh * kw, split.splits_n,
            split.images, split.places, split.split_n, first_run,
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            *_nhw_strides(grad), *_nhw_strides(x), *out.stride(),
            HAS_IN_AFFINE=in_scale is not None, IN_ACT=ACTIVATION_CODES[prologue.activation],
            INPUT_PRECISION=input_precision(x.dtype), UPCAST=_upcast_dot(x), VEC=vec,
            VEC_OUT=vec_out, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
        if split.splits == 1:
            return out[0]
        total = out.sum(0) if total is None else total + out.sum(0)
    return total.to(x.dtype, memory_format=memory_format)


def _weight_slabs(slabs: int, weight_shape, x: torch.Tensor, dtype, memory_format) -> torch.Tensor:
    """(slabs, C_out, C_in/groups, KH, KW) with each slab in `memory_format` (the kernel stores
    through any strides)."""
    if memory_format == torch.channels_last:
        c_out, cin_g, kh, kw = weight_shape
        return _alloc.empty((slabs, c_out, kh, kw, cin_g), x, dtype=dtype).permute(0, 1, 4, 2, 3)
    return _alloc.empty((slabs, *weight_shape), x, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# compile-for-target cases
# ---------------------------------------------------------------------------------------------

_KERNELS = {"forward": _conv_forward_kernel, "input_grad": _conv_input_grad_kernel,
            "weight_grad": _conv_weight_grad_kernel}
_FUSION_FLAGS = ("HAS_BIAS", "HAS_IN_AFFINE", "IN_ACT", "HAS_OUT_AFFINE", "HAS_RESIDUAL",
                 "OUT_ACT", "STATS")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_cases():
    """Every (kernel, tile config, vector width, dtype, precision) the launchers or the
    autotuner can pick, with the fusion hooks all off and all on (the two ends of every
    constexpr branch), for the compile-for-target check. fp32 runs TF32 where cuDNN's switch
    allows it and ieee (FMA, no tensor cores) where not: both are compiled."""
    from .compile_case import CompileCase, kernel_signature

    cases = []
    precisions = [(name, dtype, "tf32" if dtype == torch.float32 else "ieee")
                  for name, dtype in _DTYPES.items()] + [("fp32", torch.float32, "ieee")]
    for dtype_name, dtype, precision in precisions:
        label = dtype_name + ("-ieee" if dtype == torch.float32 and precision == "ieee" else "")
        for kernel_name, kernel in _KERNELS.items():
            params = inspect.signature(kernel.fn).parameters
            signature = kernel_signature(
                kernel, lambda name: "*fp32" if name == "stats_ptr" else f"*{dtype_name}")
            flags = [f for f in _FUSION_FLAGS if f in params]
            for aligned in (True, False):
                vec = 16 // dtype.itemsize if aligned else 1
                # the output channels' vectors: with the input channels', or alone
                # (unaligned input channels, aligned output channels: the stem)
                vec_outs = ((vec,) if aligned else (1, 16 // dtype.itemsize)) \
                    if "VEC_OUT" in params else (None,)
                configs = [(config, vec_out) for vec_out in vec_outs
                           for config in conv_tuning.candidates(
                               kernel_name, dtype, aligned, precision,
                               vector_out=bool(vec_out and vec_out > 1))]
                for config, vec_out in configs:
                    for fused in ((False, True) if flags or "EVEN_K" in params else (False,)):
                        constexprs = {f: (int(fused) if f.endswith("ACT") else fused) for f in flags}
                        masked_k = ""
                        if "EVEN_K" in params:  # the masked channel blocks with the fused hooks
                            constexprs["EVEN_K"] = not fused
                            masked_k = ",masked_k" if fused else ""
                        constexprs.update(INPUT_PRECISION=precision, UPCAST=False, VEC=vec,
                                          BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                                          BLOCK_K=config.block_k)
                        vectors = f"vec{vec}"
                        if vec_out is not None:
                            constexprs["VEC_OUT"] = vec_out
                            vectors += f",vec_out{vec_out}" if vec_out != vec else ""
                        name = (f"conv.{kernel_name}[{label},{config.block_m}x{config.block_n}"
                                f"x{config.block_k},w{config.num_warps},s{config.num_stages},"
                                f"{vectors}{',fused' if fused and flags else ''}{masked_k}]")
                        cases.append(CompileCase(name, kernel, signature, constexprs,
                                                 num_warps=config.num_warps,
                                                 num_stages=config.num_stages,
                                                 expects_mma=precision != "ieee" or dtype != torch.float32))
    return cases
