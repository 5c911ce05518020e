"""Triton kernels for block-diagonal grouped 2-D convolution: forward, input-gradient and
weight-gradient as implicit GEMMs, with the group on grid axis 2.

Every tensor is addressed through its four (n, c, h, w) strides, so NCHW, channels_last and
non-contiguous views all run without a copy; channels_last is the fast layout (a tile's
channel run is contiguous, so loads coalesce). The GEMM views, per group g:
  forward      rows = output pixels (n, oh, ow), cols = output channels, K = (kh, kw, c_in)
  input grad   rows = input pixels (n, ih, iw),  cols = input channels,  K = (kh, kw, c_out)
  weight grad  rows = output channels,           cols = input channels,  K = output pixels,
               one program column per tap (kh, kw) and per split of the pixel range
A 1x1 kernel is the same code with a single tap: a grouped GEMM.

Fusion hooks (all constexpr-gated, so the plain conv pays nothing):
  prologue  x_hat = act(x * in_scale[c] + in_shift[c]) while loading; padding stays zero
            after it (padding applies to the transformed activation, as conv(relu(bn(x))));
  epilogue  out = act(y * out_scale[c] + out_shift[c] + residual), y = conv + bias;
  stats     per-output-channel sum and sum of squares of y in fp32, written per row-block
            (deterministic, no atomics) and summed by the launcher.
Accumulation is fp32 (tl.dot); fp32 inputs use TF32 only when the caller allows it.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import _alloc
from . import conv_tuning

ACTIVATIONS = {None: 0, "relu": 1}  # name -> the ACT constexpr of the kernels


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bf16 as raw uint16 bits: do it in fp32 there
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _load_input_tile(x_ptr, in_scale_ptr, in_shift_ptr, pix_off, pix_ok, chan, chan_ok, sx_c,
                     HAS_IN_AFFINE: tl.constexpr, IN_ACT: tl.constexpr):
    """[pixels, channels] tile of the (transformed) input; zero where padded or out of range."""
    ok = pix_ok[:, None] & chan_ok[None, :]
    a = tl.load(x_ptr + pix_off[:, None] + chan.to(tl.int64)[None, :] * sx_c, mask=ok, other=0.0)
    if HAS_IN_AFFINE or IN_ACT != 0:
        u = a.to(tl.float32)
        if HAS_IN_AFFINE:
            scale = tl.load(in_scale_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32)
            shift = tl.load(in_shift_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32)
            u = u * scale[None, :] + shift[None, :]
        u = _activate(u, IN_ACT)
        a = tl.where(ok, u, 0.0).to(x_ptr.dtype.element_ty)
    return a


@triton.jit
def _conv_forward_kernel(
        x_ptr, w_ptr, bias_ptr, in_scale_ptr, in_shift_ptr, out_scale_ptr, out_shift_ptr,
        res_ptr, y_ptr, stats_ptr,
        H, W, OH, OW, M, CIN_G, COUT_G, COUT, KH, KW,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w,
        sy_n, sy_c, sy_h, sy_w, sr_n, sr_c, sr_h, sr_w,
        HAS_BIAS: tl.constexpr, HAS_IN_AFFINE: tl.constexpr, IN_ACT: tl.constexpr,
        HAS_OUT_AFFINE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_ACT: tl.constexpr,
        STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = rows // (OH * OW)
    rem = rows % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < COUT_G
    co = group * COUT_G + cols
    w_col = w_ptr + co.to(tl.int64)[None, :] * sw_o

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix_off = n.to(tl.int64) * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
            for c0 in range(0, CIN_G, BLOCK_K):
                ks = c0 + tl.arange(0, BLOCK_K)
                k_ok = ks < CIN_G
                a = _load_input_tile(x_ptr, in_scale_ptr, in_shift_ptr, pix_off, pix_ok,
                                     group * CIN_G + ks, k_ok, sx_c, HAS_IN_AFFINE, IN_ACT)
                b = tl.load(w_col + ks.to(tl.int64)[:, None] * sw_i + kh * sw_h + kw * sw_w,
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST)

    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if STATS:  # [row block, 2, COUT] partial sums of the pre-epilogue output
        y_valid = tl.where(out_ok, y, 0.0)
        stats_row = stats_ptr + pid_m.to(tl.int64) * 2 * COUT + co
        tl.store(stats_row, tl.sum(y_valid, 0), mask=col_ok)
        tl.store(stats_row + COUT, tl.sum(y_valid * y_valid, 0), mask=col_ok)
    if HAS_OUT_AFFINE:
        y = y * tl.load(out_scale_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y += tl.load(out_shift_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_off = n.to(tl.int64) * sr_n + oh.to(tl.int64) * sr_h + ow.to(tl.int64) * sr_w
        y += tl.load(res_ptr + r_off[:, None] + co.to(tl.int64)[None, :] * sr_c, mask=out_ok,
                     other=0.0).to(tl.float32)
    y = _activate(y, OUT_ACT)
    y_off = n.to(tl.int64) * sy_n + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w
    tl.store(y_ptr + y_off[:, None] + co.to(tl.int64)[None, :] * sy_c,
             y.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _conv_input_grad_kernel(
        g_ptr, w_ptr, gx_ptr,
        H, W, OH, OW, M, CIN_G, COUT_G, KH, KW,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sg_n, sg_c, sg_h, sg_w, sw_o, sw_i, sw_h, sw_w, sx_n, sx_c, sx_h, sx_w,
        INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = rows // (H * W)
    rem = rows % (H * W)
    ih = rem // W
    iw = rem % W
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    col_ok = cols < CIN_G
    w_col = w_ptr + cols.to(tl.int64)[None, :] * sw_i

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        # output row oh reads input row ih through tap kh iff oh * stride = ih + pad - kh * dil
        oh_num = ih + pad_h - kh * dil_h
        oh = tl.where(oh_num >= 0, oh_num, 0) // stride_h
        h_ok = (oh_num >= 0) & (oh_num % stride_h == 0) & (oh < OH)
        for kw in range(KW):
            ow_num = iw + pad_w - kw * dil_w
            ow = tl.where(ow_num >= 0, ow_num, 0) // stride_w
            pix_ok = row_ok & h_ok & (ow_num >= 0) & (ow_num % stride_w == 0) & (ow < OW)
            pix_off = n.to(tl.int64) * sg_n + oh.to(tl.int64) * sg_h + ow.to(tl.int64) * sg_w
            for c0 in range(0, COUT_G, BLOCK_K):
                ks = c0 + tl.arange(0, BLOCK_K)
                k_ok = ks < COUT_G
                co = group * COUT_G + ks
                a = tl.load(g_ptr + pix_off[:, None] + co.to(tl.int64)[None, :] * sg_c,
                            mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_col + co.to(tl.int64)[:, None] * sw_o + kh * sw_h + kw * sw_w,
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST)

    x_off = n.to(tl.int64) * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
    ci = group * CIN_G + cols
    tl.store(gx_ptr + x_off[:, None] + ci.to(tl.int64)[None, :] * sx_c,
             acc.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv_weight_grad_kernel(
        g_ptr, x_ptr, in_scale_ptr, in_shift_ptr, gw_ptr,
        H, W, OH, OW, P, CIN_G, COUT_G, KW, TAPS, SPLIT_LEN,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w,
        sgw_s, sgw_o, sgw_i, sgw_h, sgw_w,
        HAS_IN_AFFINE: tl.constexpr, IN_ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tiles_n = tl.cdiv(CIN_G, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    tap = tl.program_id(1) % TAPS
    kh = tap // KW
    kw = tap % KW
    split = tl.program_id(1) // TAPS
    group = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel within the group
    row_ok = rows < COUT_G
    co = group * COUT_G + rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    col_ok = cols < CIN_G
    ci = group * CIN_G + cols
    g_row = g_ptr + co.to(tl.int64)[:, None] * sg_c

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_begin = split * SPLIT_LEN
    p_end = tl.minimum(p_begin + SPLIT_LEN, P)
    for p0 in range(p_begin, p_end, BLOCK_K):
        ps = p0 + tl.arange(0, BLOCK_K)
        p_ok = ps < p_end
        n = ps // (OH * OW)
        rem = ps % (OH * OW)
        oh = rem // OW
        ow = rem % OW
        g_off = n.to(tl.int64) * sg_n + oh.to(tl.int64) * sg_h + ow.to(tl.int64) * sg_w
        a = tl.load(g_row + g_off[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix_off = n.to(tl.int64) * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
        b = _load_input_tile(x_ptr, in_scale_ptr, in_shift_ptr, pix_off, pix_ok, ci, col_ok, sx_c,
                             HAS_IN_AFFINE, IN_ACT)
        acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST)

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


def input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 only where cuDNN would use it (torch.backends.cudnn.allow_tf32)."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


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


def _strides4(t: torch.Tensor):
    return tuple(t.stride())


def output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                 memory_format=torch.contiguous_format, prologue: Prologue = Prologue(),
                 epilogue: Epilogue = Epilogue(), channel_stats: bool = False):
    """y = epilogue(conv(prologue(x)) + bias); returns (y, sum, sum of squares), the fp32
    per-channel sums of the pre-epilogue output (None, None without channel_stats)."""
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    oh = output_size(h, kh, stride[0], padding[0] + padding[1], dilation[0])
    ow = output_size(w, kw, stride[1], padding[2] + padding[3], dilation[1])
    m = n * oh * ow
    y = _alloc.empty((n, c_out, oh, ow), x, memory_format=memory_format)
    config = conv_tuning.pick("forward", x, m, cout_g, cin_g,
                              lambda cfg: _launch_forward(cfg, x, weight, bias, y, None, stride,
                                                          padding, dilation, groups, prologue,
                                                          epilogue))
    tiles_m = triton.cdiv(m, config.block_m)
    partial = _alloc.empty((tiles_m, 2, c_out), x, dtype=torch.float32) if channel_stats else None
    _launch_forward(config, x, weight, bias, y, partial, stride, padding, dilation, groups,
                    prologue, epilogue)
    if not channel_stats:
        return y, None, None
    return y, partial[:, 0].sum(0), partial[:, 1].sum(0)


def _launch_forward(config, x, weight, bias, y, partial, stride, padding, dilation, groups,
                    prologue: Prologue, epilogue: Epilogue):
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    oh, ow = y.shape[2:]
    m = n * oh * ow
    in_scale, in_shift = _affine(prologue.scale, prologue.shift, c_in, x)
    out_scale, out_shift = _affine(epilogue.scale, epilogue.shift, c_out, x)
    residual = epilogue.residual
    dummy = y  # stands in for absent pointers; never dereferenced (constexpr-gated)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(cout_g, config.block_n), groups)
    _conv_forward_kernel[grid](
        x, weight, dummy if bias is None else bias, dummy if in_scale is None else in_scale,
        dummy if in_shift is None else in_shift, dummy if out_scale is None else out_scale,
        dummy if out_shift is None else out_shift, dummy if residual is None else residual, y,
        dummy if partial is None else partial,
        h, w, oh, ow, m, cin_g, cout_g, c_out, kh, kw,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *_strides4(x), *_strides4(weight), *_strides4(y),
        *(_strides4(residual) if residual is not None else (0, 0, 0, 0)),
        HAS_BIAS=bias is not None, HAS_IN_AFFINE=in_scale is not None,
        IN_ACT=ACTIVATIONS[prologue.activation], HAS_OUT_AFFINE=out_scale is not None,
        HAS_RESIDUAL=residual is not None, OUT_ACT=ACTIVATIONS[epilogue.activation],
        STATS=partial is not None, INPUT_PRECISION=input_precision(x.dtype), UPCAST=_upcast_dot(x),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


def conv_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int],
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    groups: int, memory_format=torch.contiguous_format) -> torch.Tensor:
    """d loss / d (conv input), the input being the (transformed) activation x_hat."""
    n, c_in, h, w = input_shape
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    grad_input = _alloc.empty((n, c_in, h, w), grad, memory_format=memory_format)
    m = n * h * w
    config = conv_tuning.pick("input_grad", grad, m, cin_g, cout_g, lambda cfg: _launch_input_grad(
                                  cfg, grad, weight, grad_input, stride, padding, dilation, groups))
    _launch_input_grad(config, grad, weight, grad_input, stride, padding, dilation, groups)
    return grad_input


def _launch_input_grad(config, grad, weight, grad_input, stride, padding, dilation, groups):
    n, c_in, h, w = grad_input.shape
    c_out, cin_g, kh, kw = weight.shape
    oh, ow = grad.shape[2:]
    m = n * h * w
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(cin_g, config.block_n), groups)
    _conv_input_grad_kernel[grid](
        grad, weight, grad_input, h, w, oh, ow, m, cin_g, c_out // groups, kh, kw,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *_strides4(grad), *_strides4(weight), *_strides4(grad_input),
        INPUT_PRECISION=input_precision(grad.dtype), UPCAST=_upcast_dot(grad),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


def conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     groups: int, prologue: Prologue = Prologue()) -> torch.Tensor:
    """d loss / d weight, reading the input through the prologue (x_hat is never stored)."""
    c_out, cin_g, kh, kw = weight_shape
    cout_g = c_out // groups
    p = grad.shape[0] * grad.shape[2] * grad.shape[3]
    config = conv_tuning.pick("weight_grad", x, cout_g, cin_g, p,
                              lambda cfg: _launch_weight_grad(cfg, grad, x, weight_shape, stride,
                                                              padding, dilation, groups, prologue))
    return _launch_weight_grad(config, grad, x, weight_shape, stride, padding, dilation, groups,
                               prologue)


def weight_grad_splits(config, weight_shape, groups: int, pixels: int, device: torch.device) -> int:
    """How many programs share one tap's pixel range: enough programs to fill the GPU, while
    each keeps a few K-steps to amortise its partial-sum store."""
    c_out, cin_g, kh, kw = weight_shape
    programs = (triton.cdiv(c_out // groups, config.block_m) * triton.cdiv(cin_g, config.block_n)
                * kh * kw * groups)
    target = 2 * conv_tuning.multiprocessors(device)
    most = max(1, pixels // (4 * config.block_k))
    return max(1, min(most, math.ceil(target / programs)))


def _launch_weight_grad(config, grad, x, weight_shape, stride, padding, dilation, groups,
                        prologue: Prologue):
    c_out, cin_g, kh, kw = weight_shape
    n, c_in, h, w = x.shape
    oh, ow = grad.shape[2:]
    p = n * oh * ow
    splits = weight_grad_splits(config, weight_shape, groups, p, x.device)
    split_len = triton.cdiv(triton.cdiv(p, splits), config.block_k) * config.block_k
    splits = triton.cdiv(p, split_len)
    if splits == 1:
        out = _alloc.empty((1, *weight_shape), x)
    else:  # fp32 partial sums, one slab per split, summed below (deterministic)
        out = _alloc.empty((splits, *weight_shape), x, dtype=torch.float32)
    in_scale, in_shift = _affine(prologue.scale, prologue.shift, c_in, x)
    grid = (triton.cdiv(c_out // groups, config.block_m) * triton.cdiv(cin_g, config.block_n),
            kh * kw * splits, groups)
    _conv_weight_grad_kernel[grid](
        grad, x, out if in_scale is None else in_scale, out if in_shift is None else in_shift, out,
        h, w, oh, ow, p, cin_g, c_out // groups, kw, kh * kw, split_len,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *_strides4(grad), *_strides4(x), *tuple(out.stride()),
        HAS_IN_AFFINE=in_scale is not None, IN_ACT=ACTIVATIONS[prologue.activation],
        INPUT_PRECISION=input_precision(x.dtype), UPCAST=_upcast_dot(x),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# compile-for-target cases
# ---------------------------------------------------------------------------------------------

class CompileCase(NamedTuple):
    name: str  # kernel name + config + fusion variant, for test ids
    dtype: str  # "fp32" | "fp16" | "bf16"
    kernel: object  # the @triton.jit function
    signature: dict  # arg name -> Triton type ("*fp16", "i32", "constexpr")
    constexprs: dict  # constexpr arg name -> value
    num_warps: int
    num_stages: int


_KERNELS = {"forward": _conv_forward_kernel, "input_grad": _conv_input_grad_kernel,
            "weight_grad": _conv_weight_grad_kernel}
_FUSION_FLAGS = ("HAS_BIAS", "HAS_IN_AFFINE", "IN_ACT", "HAS_OUT_AFFINE", "HAS_RESIDUAL",
                 "OUT_ACT", "STATS")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_cases():
    """Every (kernel, tile config, dtype) the launchers or the autotuner can pick, each with the
    fusion hooks all off and all on (the two ends of every constexpr branch), for the
    compile-for-target check. fp32 cases use TF32, the tensor-core path of fp32."""
    cases = []
    for dtype_name, dtype in _DTYPES.items():
        ptr = f"*{dtype_name}"
        precision = "tf32" if dtype == torch.float32 else "ieee"
        for kernel_name, kernel in _KERNELS.items():
            for config in conv_tuning.candidates(kernel_name, dtype):
                flags = [f for f in _FUSION_FLAGS if f in kernel.arg_names]
                for fused in ((False, True) if flags else (False,)):
                    signature, constexprs = {}, {}
                    for name, param in inspect.signature(kernel.fn).parameters.items():
                        if "constexpr" in str(param.annotation):
                            signature[name] = "constexpr"
                        elif name.endswith("_ptr"):
                            signature[name] = "*fp32" if name == "stats_ptr" else ptr
                        else:
                            signature[name] = "i32"
                    for flag in flags:
                        constexprs[flag] = int(fused) if flag.endswith("ACT") else fused
                    constexprs.update(INPUT_PRECISION=precision, UPCAST=False, BLOCK_M=config.block_m,
                                      BLOCK_N=config.block_n, BLOCK_K=config.block_k)
                    label = (f"{kernel_name}-{dtype_name}-{config.block_m}x{config.block_n}x"
                             f"{config.block_k}w{config.num_warps}s{config.num_stages}"
                             f"{'-fused' if fused else ''}")
                    cases.append(CompileCase(label, dtype_name, kernel, signature, constexprs,
                                             config.num_warps, config.num_stages))
    return cases
