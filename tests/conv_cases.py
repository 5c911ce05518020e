# SPDX-License-Identifier: Apache-2.0
"""Convolution test cases shared by the Triton and the CUDA/simt conv tests: the shape grid, the
fusion option sets, input builders and the fused op spelled out in plain torch."""

import torch
import torch.nn.functional as F

import packed_kernels as pk

from conftest import require_backend
from helpers import assert_all_finite, assert_close

# name: (batch, c_in, c_out, (h, w), kernel, stride, padding, dilation, groups)
CASES = {
    "pe_3x3_3ch_per_group": (1, 12, 12, (7, 7), 3, 1, 1, 1, 4),
    "pe_1x1_split_wgrad": (2, 16, 32, (16, 16), 1, 1, 0, 1, 4),
    "downsample_1x1_s2_odd": (1, 8, 16, (7, 5), 1, 2, 0, 1, 2),
    "3x3_s2_odd_batch1": (1, 8, 8, (7, 7), 3, 2, 1, 1, 2),
    "stem_7x7_s2": (1, 3, 8, (9, 9), 7, 2, 3, 1, 1),
    "same_even_kernel_dilated": (2, 6, 4, (6, 7), (4, 2), 1, "same", 2, 2),
    "depthwise_dilated": (1, 6, 6, (7, 7), 3, 1, 2, 2, 6),
    "dense_multi_chunk_multi_tile": (1, 40, 136, (3, 3), 1, 1, 0, 1, 1),
    "asymmetric_everything": (2, 4, 6, (8, 6), (3, 2), (2, 1), (2, 0), (1, 2), 2),
}


def make_case(case, dtype, device, layout):
    n, c_in, c_out, hw, k, stride, padding, dilation, groups = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c_in, *hw, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider map: no dense layout
        x = torch.randn(n, c_in, hw[0], 2 * hw[1], dtype=dtype)
    x = x.to(device)  # before slicing: a copy to another device makes a strided view dense
    if layout == "strided":
        x = x[..., ::2]
    w = torch.randn(c_out, c_in // groups, kh, kw, dtype=dtype) / (c_in // groups * kh * kw) ** 0.5
    b = torch.randn(c_out, dtype=dtype)
    return x, w.to(device), b.to(device), dict(stride=stride, padding=padding,
                                              dilation=dilation, groups=groups)


def run_with_grads(fn, tensors, grad_seed):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_seed.to(out.dtype).to(out.device))
    return out.detach(), [leaf.grad for leaf in leaves]


OPTION_SETS = {
    "prologue": dict(in_scale=True, in_shift=True, in_activation="relu"),
    "prologue_scale_only": dict(in_scale=True),
    "epilogue": dict(out_scale=True, out_shift=True, residual=True, activation="relu"),
    "epilogue_shift_relu": dict(out_shift=True, activation="relu"),
    "stats": dict(channel_stats=True),
    "everything": dict(in_scale=True, in_shift=True, in_activation="relu", out_scale=True,
                       out_shift=True, residual=True, activation="relu", channel_stats=True),
}


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10 mantissa bits, to nearest with ties away from zero
    (cvt.rna.tf32.f32); NaN and infinities kept."""
    rounded = ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(torch.isfinite(t), rounded, t)


class _Tf32Conv2d(torch.autograd.Function):
    """F.conv2d with every product on TF32-rounded operands (x and w forward; grad with w, and
    grad with x, backward) and float32 sums: torch's cuDNN conv under allow_tf32, on a CPU."""

    @staticmethod
    def forward(ctx, x, w, b, args):
        ctx.save_for_backward(x, w)
        ctx.args, ctx.has_bias = args, b is not None
        return F.conv2d(round_tf32(x), round_tf32(w), b, **args)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            xr, wr = (round_tf32(t).detach().requires_grad_() for t in (x, w))
            grad_x, grad_w = torch.autograd.grad(F.conv2d(xr, wr, None, **ctx.args), (xr, wr), round_tf32(grad))
        return grad_x, grad_w, grad.sum((0, 2, 3)) if ctx.has_bias else None, None


def tf32_conv2d(x, w, b=None, **args):
    """The judge of a float32 conv on TF32 tensor cores (torch's own error at that precision)."""
    return _Tf32Conv2d.apply(x, w, b, args)


def fused_reference(x, w, b, in_scale, in_shift, out_scale, out_shift, residual, args, options,
                    conv=F.conv2d):
    """The fused op spelled out in plain torch ops (autograd gives the reference gradients);
    `conv`: F.conv2d, or tf32_conv2d for torch at TF32."""
    def channel(v):
        return v.reshape(1, -1, 1, 1)
    u = x
    if in_scale is not None:
        u = u * channel(in_scale)
    if in_shift is not None:
        u = u + channel(in_shift)
    if options.get("in_activation") == "relu":
        u = torch.relu(u)
    y = conv(u, w, b, **args)  # zero-pads the transformed activation
    z = y
    if out_scale is not None:
        z = z * channel(out_scale)
    if out_shift is not None:
        z = z + channel(out_shift)
    if residual is not None:
        z = z + residual
    if options.get("activation") == "relu":
        z = torch.relu(z)
    if options.get("channel_stats"):
        y32 = y.to(torch.float64 if y.dtype == torch.float64 else torch.float32)
        var, mean = torch.var_mean(y32, (0, 2, 3), correction=0)
        return z, mean, var
    return (z,)


def fused_inputs(dtype, device, layout, options, case="pe_3x3_3ch_per_group"):
    """`case`: a name in CASES or a case tuple."""
    x, w, b, args = make_case(CASES[case] if isinstance(case, str) else case, dtype, device, layout)
    c_in, c_out = x.shape[1], w.shape[0]
    out_shape = F.conv2d(x.cpu().double(), w.cpu().double(), None, **args).shape

    def vec(n, offset):  # scales around 1 (some negative), shifts of both signs
        return (torch.randn(n) * 0.5 + offset).to(dtype).to(device)
    tensors = dict(
        in_scale=vec(c_in, 1.0) if options.get("in_scale") else None,
        in_shift=vec(c_in, 0.3) if options.get("in_shift") else None,
        out_scale=vec(c_out, 1.0) if options.get("out_scale") else None,
        out_shift=vec(c_out, 0.0) if options.get("out_shift") else None,
        residual=torch.randn(out_shape, dtype=dtype).to(device) if options.get("residual") else None,
    )
    if tensors["residual"] is not None and options.get("activation") == "relu":
        tensors["residual"] = _relu_margin(x, w, b, tensors, args, options, RELU_MARGIN)
    if layout == "channels_last" and tensors["residual"] is not None:
        tensors["residual"] = tensors["residual"].to(memory_format=torch.channels_last)
    return x, w, b, tensors, args


# The output ReLU's mask where its input is within 16-bit rounding of 0 is a coin flip: every
# engine rounds x_hat to the input dtype before the tensor cores, and one flipped element moves
# the gradients of a small case by ~2e-2. The residual keeps every pre-activation this far from 0.
RELU_MARGIN = 0.1


def _relu_margin(x, w, b, tensors, args, options, margin):
    def f64(t):
        return None if t is None else t.detach().cpu().double()
    pre = dict(options, activation=None, channel_stats=False)
    z = fused_reference(f64(x), f64(w), f64(b), *(f64(tensors[k]) for k in (
        "in_scale", "in_shift", "out_scale", "out_shift", "residual")), args, pre)[0]
    push = torch.where(z >= 0, margin - z, -margin - z).clamp(min=-2 * margin, max=2 * margin)
    push = torch.where(z.abs() < margin, push, torch.zeros_like(z))
    residual = tensors["residual"]
    return (f64(residual) + push).to(residual.dtype).to(residual.device)


def fused_run(fn, x, w, b, tensors, seeds):
    names = [k for k, v in tensors.items() if v is not None]
    leaves = [t.detach().clone().requires_grad_() for t in [x, w, b] + [tensors[k] for k in names]]
    outs = fn(*leaves, names)
    loss = sum((o.double() * s.to(o.device)).sum() for o, s in zip(outs, seeds))
    loss.backward()
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


# Every option set in fp32, and everything at once in each 16-bit type (CI budget).
FUSED_CASES = [(name, torch.float32) for name in OPTION_SETS] + \
    [("everything", torch.float16), ("everything", torch.bfloat16)]


def check_fused_matches_fp64(backend, options, dtype, layout, case="pe_3x3_3ch_per_group", tf32=False):
    """fused_conv2d on `backend`, outputs and every gradient, against float64 and torch's own error
    (tf32: float32 with torch.backends.cudnn.allow_tf32 set, judged against torch at TF32)."""
    device = require_backend(backend, dtype)
    opts = OPTION_SETS[options]
    x, w, b, tensors, args = fused_inputs(dtype, device, layout, opts, case)
    flags = {k: opts[k] for k in ("in_activation", "activation", "channel_stats") if k in opts}

    def ours(x, w, b, *rest, names):
        out = pk.fused_conv2d(x, w, b, **args, **dict(zip(names, rest)), **flags, backend=backend)
        return out if isinstance(out, tuple) else (out,)

    def reference(x, w, b, *rest, names, conv=F.conv2d):
        kw = {k: None for k in tensors}
        kw.update(zip(names, rest))
        return fused_reference(x, w, b, kw["in_scale"], kw["in_shift"], kw["out_scale"],
                                kw["out_shift"], kw["residual"], args, opts, conv)

    outputs = 3 if opts.get("channel_stats") else 1
    out_shape = F.conv2d(x.cpu().double(), w.cpu().double(), None, **args).shape
    seeds = [torch.randn(out_shape, dtype=torch.float64)] + \
        [torch.randn(w.shape[0], dtype=torch.float64) for _ in range(outputs - 1)]
    cpu = {k: None if v is None else v.cpu() for k, v in tensors.items()}
    ours_out, ours_grads = fused_run(lambda *t: ours(*t[:-1], names=t[-1]), x, w, b, tensors, seeds)
    ref_out, ref_grads = fused_run(lambda *t: reference(*t[:-1], names=t[-1]), x.cpu().double(),
                                    w.cpu().double(), b.cpu().double(),
                                    {k: None if v is None else v.double() for k, v in cpu.items()}, seeds)
    low_conv = tf32_conv2d if tf32 else F.conv2d
    low_out, low_grads = fused_run(lambda *t: reference(*t[:-1], names=t[-1], conv=low_conv), x.cpu(), w.cpu(),
                                    b.cpu(), cpu, seeds)
    assert len(ours_out) == outputs
    assert_all_finite(*ours_out, *ours_grads)
    for i, (o, r, t) in enumerate(zip(ours_out, ref_out, low_out)):
        assert_close(o, r, t, dtype, f"{options} output {i}")
    names = ["input", "weight", "bias"] + [k for k, v in tensors.items() if v is not None]
    for name, g, r, t in zip(names, ours_grads, ref_grads, low_grads):
        assert_close(g, r, t, dtype, f"{options} grad {name}")
