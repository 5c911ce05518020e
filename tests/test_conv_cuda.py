# SPDX-License-Identifier: Apache-2.0
"""The CUDA C++ grouped convolution (csrc/kernels/conv.cuh) through backend="simt" (the same
source on the SIMT emulator, barrier orders shuffled) and, on a GPU, backend="cuda".

Results are judged against torch in float64 (tests/helpers.py: low precision against torch's
own error at that precision). The shape grid and fusion option sets are the Triton conv tests'
(tests/conv_cases.py): tiny but odd shapes on which every kernel path runs (several row and
column tiles, K tails, masked taps, strides, dilation, asymmetric padding, split weight-grad)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels import _backend
from packed_kernels.ops import conv as conv_ops
from packed_kernels.ops import conv_engines

from conftest import HAS_GPU, REQUIRED, require_backend
from helpers import (CSRC, assert_all_finite, assert_close, build_sanitized_selftest, relative_error,
                     run_sanitized)
from conv_cases import (CASES, FUSED_CASES, OPTION_SETS, check_fused_matches_fp64,
                        fused_inputs, make_case, run_with_grads, tf32_conv2d)

# Every case in fp32 with both layouts and in each 16-bit type (the kernels see channels_last
# only: NCHW goes through the layout transform in ops/conv.py).
GRID = [(name, dtype, layout) for name in CASES
        for dtype, layout in ((torch.float32, "nchw"), (torch.float32, "channels_last"),
                              (torch.float16, "channels_last"), (torch.bfloat16, "nchw"))]


def _ids(v):
    return str(v).replace("torch.", "")


def _check_conv(backend, name, dtype, layout, case=None):
    device = require_backend(backend, dtype)
    x, w, b, args = make_case(CASES[name] if case is None else case, dtype, device, layout)
    grad_seed = torch.randn(F.conv2d(x.cpu().double(), w.cpu().double(), None, **args).shape)
    ours, ours_grads = run_with_grads(lambda *t: pk.grouped_conv2d(*t, **args, backend=backend), (x, w, b),
                              grad_seed)
    ref, ref_grads = run_with_grads(lambda *t: F.conv2d(*t, **args),
                            (x.cpu().double(), w.cpu().double(), b.cpu().double()), grad_seed)
    lowp, lowp_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x.cpu(), w.cpu(), b.cpu()), grad_seed)
    assert ours.dtype == dtype
    # NaN-poisoned outputs (conftest): a finite result means every element was written.
    assert_all_finite(ours, *ours_grads)
    assert_close(ours, ref, lowp, dtype, f"{name} forward")
    for what, g, r, t in zip(("input", "weight", "bias"), ours_grads, ref_grads, lowp_grads):
        assert_close(g, r, t, dtype, f"{name} grad {what}")
    channels_last = layout == "channels_last"
    assert ours.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert ours_grads[0].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("name, dtype, layout", GRID, ids=_ids)
def test_simt_grouped_conv2d_matches_fp64(name, dtype, layout):
    _check_conv("simt", name, dtype, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=_ids)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_grouped_conv2d_matches_fp64(name, dtype, layout):
    _check_conv("cuda", name, dtype, layout)


# 16-bit channels_last with 8k channels per group: the cp.async pipeline (forward, input grad,
# weight grad) over more K slices than it has stages, with tails, padding taps and row tails.
PIPELINE_CASES = {
    "pipeline_3x3_grouped": (2, 48, 48, (9, 7), 3, 1, 1, 1, 2),        # depth 216: 7 slices
    "pipeline_3x3_s2_dilated": (1, 16, 32, (11, 10), 3, 2, 2, 2, 1),   # strided input grad, zero phases
}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_ids)
@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_simt_pipelined_16bit_conv_matches_fp64(name, dtype):
    _check_conv("simt", name, dtype, "channels_last", PIPELINE_CASES[name])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_ids)
def test_simt_pipelined_16bit_fused_matches_fp64(dtype):
    """The prologue applied by each thread to its own cp.async copies (forward: x; weight grad:
    x again), with the epilogue and statistics, padding taps kept zero."""
    check_fused_matches_fp64("simt", "everything", dtype, "channels_last", PIPELINE_CASES["pipeline_3x3_s2_dilated"])


def test_simt_strided_input():
    device = require_backend("simt")
    x, w, b, args = make_case(CASES["3x3_s2_odd_batch1"], torch.float32, device, "strided")
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    grad_seed = torch.randn(F.conv2d(x.double(), w.double(), None, **args).shape)
    ours, ours_grads = run_with_grads(lambda *t: pk.grouped_conv2d(*t, **args, backend="simt"), (x, w, b), grad_seed)
    ref, ref_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x.double(), w.double(), b.double()), grad_seed)
    assert_close(ours, ref, ours, torch.float32, "strided forward")
    for g, r in zip(ours_grads, ref_grads):
        assert_close(g, r, g, torch.float32, "strided grads")


@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last))
@pytest.mark.parametrize("splits", (1, 3, 40))
def test_simt_weight_grad_any_split_count(splits, memory_format):
    """Every fp32 slab is written, including empty ones (40 slabs of a 25-pixel range); the
    result comes in the asked memory format (the weight's)."""
    device = require_backend("simt")
    x, w, _, args = make_case(CASES["pe_3x3_3ch_per_group"], torch.float32, device, "nchw")
    x = x[:1, :, :5, :5].contiguous()
    grad = torch.randn(1, w.shape[0], 5, 5)
    ours = conv_engines.csrc_conv_weight_grad("simt", grad, x, w.shape, (1, 1), (1, 1, 1, 1), (1, 1),
                                          args["groups"], splits=splits, memory_format=memory_format)
    assert ours.is_contiguous(memory_format=memory_format)
    _, ref, _ = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), w.double(), None, [1, 1], [1, 1], [1, 1], False, [0, 0],
        args["groups"], [False, True, False])
    assert_close(ours, ref, ours, torch.float32, f"weight grad with {splits} splits")


# ---------------------------------------------------------------------------------------------
# strided input gradient: the kernel visits only the taps of each input pixel's stride phase
# ---------------------------------------------------------------------------------------------

# name: ((h, w), (kh, kw), (stride_h, stride_w), (top, bottom, left, right), (dil_h, dil_w), groups)
INPUT_GRAD_PHASE_CASES = {
    "s2_k3_pad0_odd": ((7, 9), (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "s2_k3_pad1_odd": ((9, 7), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2),
    "s2_k3_pad2": ((5, 6), (3, 3), (2, 2), (2, 2, 2, 2), (1, 1), 1),
    "s3_k3_pad1": ((10, 11), (3, 3), (3, 3), (1, 1, 1, 1), (1, 1), 1),
    "s3_k5_pad2_odd": ((11, 8), (5, 5), (3, 3), (2, 2, 2, 2), (1, 1), 2),
    # stride and dilation share a factor: odd phases have no taps, their gradient is zero
    "s2_d2_k3_pad2": ((9, 9), (3, 3), (2, 2), (2, 2, 2, 2), (2, 2), 1),
    "projection_1x1_s2": ((7, 5), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 2),
    "mixed_s23_d31_asym_pad": ((9, 10), (3, 4), (2, 3), (1, 0, 2, 1), (3, 1), 1),
    "stride_beyond_kernel_and_map": ((3, 7), (2, 2), (4, 3), (0, 1, 1, 0), (1, 2), 1),
}


@pytest.mark.parametrize("dtype, per_group", [(torch.float32, 3), (torch.float16, 8)], ids=_ids)
@pytest.mark.parametrize("name", list(INPUT_GRAD_PHASE_CASES))
def test_simt_strided_input_grad_matches_fp64(name, dtype, per_group):
    """fp32 with 3 channels per group (scalar loads), fp16 with 8 (16-byte loads)."""
    require_backend("simt", dtype)
    hw, kernel, stride, pad, dilation, groups = INPUT_GRAD_PHASE_CASES[name]
    c_in, c_out = groups * per_group, groups * (per_group + (8 if per_group % 8 == 0 else 2))
    x = torch.randn(2, c_in, *hw, dtype=torch.float64)
    w = torch.randn(c_out, per_group, *kernel, dtype=torch.float64) / (per_group * kernel[0] * kernel[1]) ** 0.5

    def conv(x, w):  # asymmetric padding as an explicit pad, so torch's autograd gives the reference
        return F.conv2d(F.pad(x, (pad[2], pad[3], pad[0], pad[1])), w, stride=stride, dilation=dilation,
                        groups=groups)

    grad = torch.randn(conv(x, w).shape, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    ref = torch.autograd.grad(conv(leaf, w), leaf, grad)[0]
    low = x.to(dtype).requires_grad_()
    lowp = torch.autograd.grad(conv(low, w.to(dtype)), low, grad.to(dtype))[0]
    ours = conv_engines.csrc_conv_input_grad("simt", grad.to(dtype), w.to(dtype), x.shape, stride, pad,
                                         dilation, groups)
    assert ours.dtype == dtype
    assert_all_finite(ours)  # zero-gradient phases are written too
    assert_close(ours, ref, lowp, dtype, f"{name} input grad")


# ---------------------------------------------------------------------------------------------
# narrow groups: few channels per group on one side of the conv (a stem's 3 input channels)
# ---------------------------------------------------------------------------------------------

# 16-bit, stride 1, grad's channels per group a multiple of 8, the input's not: the input gradient
# runs as the forward of grad with the rewritten weight (conv.cuh's input_grad_as_forward), both
# read in 16-byte runs along its depth, on the narrow 128 x 16 tile where the input channels per
# group fit it, the result written element by element (tests/test_simt_hopper.py checks which
# kernel runs). At stride 2, with padding past the taps' reach and in fp32 the input-gradient
# kernel runs; the forward and weight gradient of these shapes read element by element.
NARROW_INPUT_CASES = {
    "stem_3x3_row_tiles": (3, 3, 16, (10, 9), 3, 1, 1, 1, 1),        # 270 rows: 3 tiles; 5 slices
    "stem_grouped": (2, 6, 32, (7, 9), 3, 1, 1, 1, 2),                # 3 channels per group
    "12_channels_dilated_unpadded": (1, 12, 8, (9, 8), 3, 1, 0, 2, 1),
    "even_kernel_same_padding": (1, 3, 24, (6, 7), (2, 4), 1, "same", 1, 1),  # uneven sides
    "20_channels": (1, 20, 16, (5, 6), 3, 1, 1, 1, 1),                # wider than the narrow tile
    "stride_2": (2, 3, 16, (9, 8), 3, 2, 1, 1, 1),                    # input-gradient kernel
    "padding_past_the_taps": (1, 3, 16, (5, 5), 3, 1, 3, 1, 1),       # input-gradient kernel
}
# The forward with 16-byte runs of 8k input channels per group and at most 16 output channels:
# the narrow tile (128-row blocks, two 64-row statistics tiles each).
NARROW_OUTPUT_CASES = {
    "3_outputs_row_tail": (2, 16, 3, (9, 10), 3, 1, 1, 1, 1),         # 180 rows: a 52-row last tile
    "8_outputs_per_group_s2": (1, 32, 16, (11, 9), 3, 2, 1, 1, 2),
    "16_outputs_dilated": (1, 8, 16, (12, 11), 3, 1, 2, 2, 1),
}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=_ids)
@pytest.mark.parametrize("name", list(NARROW_INPUT_CASES) + list(NARROW_OUTPUT_CASES))
def test_simt_narrow_groups_match_fp64(name, dtype):
    _check_conv("simt", name, dtype, "channels_last", {**NARROW_INPUT_CASES, **NARROW_OUTPUT_CASES}[name])


@pytest.mark.parametrize("options", ["everything", "stats"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_ids)
def test_simt_narrow_forward_fused_matches_fp64(options, dtype):
    check_fused_matches_fp64("simt", options, dtype, "channels_last", NARROW_OUTPUT_CASES["3_outputs_row_tail"])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_ids)
def test_simt_narrow_input_grad_of_a_misaligned_grad_matches_fp64(dtype):
    """grad two bytes past a 16-byte boundary: no 16-byte runs, the input-gradient kernel."""
    require_backend("simt", dtype)
    n, c_in, c_out, hw, k, stride, padding, dilation, groups = NARROW_INPUT_CASES["stem_grouped"]
    x = torch.randn(n, c_in, *hw, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64) / (c_in // groups * k * k) ** 0.5
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    grad = torch.randn(F.conv2d(x, w, **args).shape, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    ref = torch.autograd.grad(F.conv2d(leaf, w, **args), leaf, grad)[0]
    low = x.to(dtype).requires_grad_()
    lowp = torch.autograd.grad(F.conv2d(low, w.to(dtype), **args), low, grad.to(dtype))[0]
    dense = grad.to(dtype).contiguous(memory_format=torch.channels_last)
    buffer = torch.empty(dense.numel() + 1, dtype=dtype)
    misaligned = buffer[1:].as_strided(dense.shape, dense.stride())
    misaligned.copy_(dense)
    assert misaligned.is_contiguous(memory_format=torch.channels_last) and misaligned.data_ptr() % 16 != 0
    ours = conv_engines.csrc_conv_input_grad("simt", misaligned, w.to(dtype), x.shape, (stride, stride),
                                             (padding,) * 4, (dilation, dilation), groups)
    assert_all_finite(ours)
    assert_close(ours, ref, lowp, dtype, "misaligned grad input grad")


# ---------------------------------------------------------------------------------------------
# fp32 on TF32 tensor cores: where torch.backends.cudnn.allow_tf32 is set (torch's default; the
# conftest clears it for every other test), as cuDNN and the Triton conv do
# ---------------------------------------------------------------------------------------------

def _check_conv_tf32(backend, name):
    device = require_backend(backend)
    x, w, b, args = make_case(CASES[name], torch.float32, device, "channels_last")
    grad_seed = torch.randn(F.conv2d(x.cpu().double(), w.cpu().double(), None, **args).shape)
    ref, ref_grads = run_with_grads(lambda *t: F.conv2d(*t, **args),
                                    (x.cpu().double(), w.cpu().double(), b.cpu().double()), grad_seed)
    judge, judge_grads = run_with_grads(lambda *t: tf32_conv2d(*t, **args), (x.cpu(), w.cpu(), b.cpu()), grad_seed)
    errors = {}
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32  # conftest restores it
        ours, ours_grads = run_with_grads(lambda *t: pk.grouped_conv2d(*t, **args, backend=backend), (x, w, b),
                                          grad_seed)
        assert_all_finite(ours, *ours_grads)
        errors[tf32] = [relative_error(t, r) for t, r in zip((ours, *ours_grads[:2]), (ref, *ref_grads[:2]))]
    assert_close(ours, ref, judge, torch.float32, f"{name} TF32 forward")
    for what, g, r, t in zip(("input", "weight", "bias"), ours_grads, ref_grads, judge_grads):
        assert_close(g, r, t, torch.float32, f"{name} TF32 grad {what}")
    # FMAs are exact to float32 rounding; TF32 (10 mantissa bits) is off by ~1e-4: it really ran
    assert max(errors[False]) < 1e-5, errors
    assert min(errors[True]) > 1e-5, errors


@pytest.mark.parametrize("name", list(CASES))
def test_simt_float32_on_tf32_matches_torch_at_tf32(name):
    _check_conv_tf32("simt", name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_float32_on_tf32_matches_torch_at_tf32(name):
    _check_conv_tf32("cuda", name)


@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_simt_fused_float32_on_tf32_matches_torch_at_tf32(options):
    torch.backends.cudnn.allow_tf32 = True  # conftest restores it
    check_fused_matches_fp64("simt", options, torch.float32, "channels_last", tf32=True)


@pytest.mark.gpu
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_cuda_fused_float32_on_tf32_matches_torch_at_tf32(options):
    torch.backends.cudnn.allow_tf32 = True  # conftest restores it
    check_fused_matches_fp64("cuda", options, torch.float32, "channels_last", tf32=True)


# ---------------------------------------------------------------------------------------------
# fused_conv2d: every option set in fp32, everything at once in each 16-bit type
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, dtype", FUSED_CASES, ids=_ids)
def test_simt_fused_conv2d_matches_fp64(options, dtype):
    check_fused_matches_fp64("simt", options, dtype, "nchw" if dtype == torch.bfloat16 else "channels_last")


@pytest.mark.gpu
@pytest.mark.parametrize("options, dtype", FUSED_CASES, ids=_ids)
def test_cuda_fused_conv2d_matches_fp64(options, dtype):
    check_fused_matches_fp64("cuda", options, dtype, "channels_last")


def test_simt_fused_float32_vectors_with_half_activations():
    """Folded BatchNorm parameters stay float32 with fp16 activations (what ConvBNAct2d passes)."""
    require_backend("simt", torch.float16)
    x, w, b, _, args = fused_inputs(torch.float16, torch.device("cpu"), "channels_last", {})
    c_in, c_out = x.shape[1], w.shape[0]
    vectors = dict(in_scale=torch.randn(c_in) * 0.5 + 1, in_shift=torch.randn(c_in) * 0.5,
                   out_scale=torch.randn(c_out) * 0.5 + 1, out_shift=torch.randn(c_out) * 0.5)
    flags = dict(in_activation="relu", activation="relu")
    ours = pk.fused_conv2d(x, w, b, **args, **vectors, **flags, backend="simt")
    ref = pk.fused_conv2d(x.double(), w.double(), b.double(), **args, **flags, backend="torch",
                          **{k: v.double() for k, v in vectors.items()})
    lowp = pk.fused_conv2d(x, w, b, **args, **vectors, **flags, backend="torch")
    assert ours.dtype == torch.float16
    assert_close(ours, ref, lowp, torch.float16, "fp32 vectors, fp16 activations")


def test_simt_padding_is_applied_after_the_prologue():
    """conv(relu(x*s+b)) zero-pads the transformed map: with shift > 0 a wrong order shows."""
    require_backend("simt")
    x = torch.randn(1, 2, 5, 5)
    w = torch.ones(2, 2, 3, 3)
    shift = torch.full((2,), 3.0)
    ours = pk.fused_conv2d(x, w, padding=1, in_shift=shift, in_activation="relu", backend="simt")
    ref = F.conv2d(torch.relu(x.double() + 3.0), w.double(), padding=1)
    assert_close(ours, ref, ours, torch.float32, "padding after prologue")


# ---------------------------------------------------------------------------------------------
# the two implementations agree (GPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_ids)
def test_cuda_agrees_with_triton(dtype):
    require_backend("cuda", dtype)
    require_backend("triton", dtype)
    opts = OPTION_SETS["everything"]
    x, w, b, tensors, args = fused_inputs(dtype, torch.device("cuda"), "channels_last", opts,
                                           "pe_1x1_split_wgrad")
    flags = dict(in_activation="relu", activation="relu", channel_stats=True)
    results = {}
    for backend in ("cuda", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out, mean, var = pk.fused_conv2d(*leaves, **args, **tensors, **flags, backend=backend)
        out.float().square().sum().backward()
        results[backend] = [out, mean, var] + [t.grad for t in leaves]
    for name, c, t in zip(("out", "mean", "var", "grad input", "grad weight", "grad bias"),
                          results["cuda"], results["triton"]):
        # Both accumulate in fp32 over the same products; they differ in summation order and in
        # where 16-bit rounding happens, so compare at the dtype's resolution.
        assert_close(c, t.double(), t, dtype, f"cuda vs triton {name}")


# ---------------------------------------------------------------------------------------------
# bad input raises before any launch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [pk.grouped_conv2d, pk.fused_conv2d], ids=["grouped", "fused"])
@pytest.mark.parametrize("bad, error, match", [
    (lambda x, w: (x, w.half(), {}), TypeError, "mixed dtypes"),
    (lambda x, w: (x, w, {"groups": 3}), ValueError, "divisible by groups"),
    (lambda x, w: (x, w[:, :1], {}), ValueError, "expects"),
    (lambda x, w: (x.int(), w.int(), {}), TypeError, "floating-point"),
    (lambda x, w: (x, w, {"bias": torch.randn(5)}), ValueError, "bias"),
])
def test_bad_input_raises_before_launch(fn, bad, error, match):
    require_backend("simt")
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3)
    x, w, kwargs = bad(x, w)
    kwargs.setdefault("groups", 2)
    with pytest.raises(error, match=match):
        fn(x, w, **kwargs, backend="simt")


def test_unsupported_dtype_and_device_raise():
    require_backend("simt")
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3)
    with pytest.raises(pk.BackendUnavailableError, match="float64"):
        pk.grouped_conv2d(x.double(), w.double(), groups=2, backend="simt")
    if not HAS_GPU:
        with pytest.raises(pk.BackendUnavailableError, match="CUDA tensors"):
            pk.grouped_conv2d(x, w, groups=2, backend="cuda")


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.update(x=a["x"].contiguous()), "channels_last"),  # NCHW into the NHWC kernel
    (lambda a: a.update(weight=a["weight"].transpose(1, 2)), "contiguous"),
    (lambda a: a.update(groups=3), "groups"),
    (lambda a: a.update(bias=torch.randn(5)), "bias"),
    (lambda a: a.update(bias=torch.randn(6).half()), "float32"),  # vectors are fp32 for every dtype
    (lambda a: a.update(y=a["y"].half()), "dtype"),
    (lambda a: a.update(stats=torch.zeros(1, 2, 6, dtype=torch.float64)), "float32"),
    (lambda a: a.update(stats=torch.zeros(5, 2, 6)), "stats"),
    (lambda a: a.update(activation=2), "activation"),
])
def test_extension_checks_its_arguments(bad, match):
    """The binding itself refuses what would make the kernel read or write out of bounds."""
    require_backend("simt")
    ext = _backend.extension("_simt")
    args = dict(x=torch.randn(1, 4, 5, 5).to(memory_format=torch.channels_last),
                weight=torch.randn(6, 3, 3, 2), bias=None, in_scale=None, in_shift=None,
                in_activation=0, out_scale=None, out_shift=None, residual=None, activation=0,
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=2,
                y=torch.full((1, 6, 5, 5), float("nan")).to(memory_format=torch.channels_last),
                stats=torch.zeros(1, 2, 6))
    ext.conv_forward(**args)  # the good call works
    assert torch.isfinite(args["y"]).all()
    bad(args)
    args["y"] = args["y"].clone()
    with pytest.raises(RuntimeError, match=match):
        ext.conv_forward(**args)


def test_simt_fused_opcheck():
    """The fused op with every option on the simt backend passes torch.library.opcheck
    (grouped_conv2d's opcheck runs for every backend in tests/test_op_registration.py)."""
    require_backend("simt")
    x = torch.randn(1, 4, 4, 5, requires_grad=True)
    w = torch.randn(4, 2, 3, 3)
    vec = torch.rand(4) + 0.5
    args = (x, w, vec, vec, vec, vec, vec, torch.randn(1, 4, 4, 5), [1, 1], [1, 1, 1, 1], [1, 1], 2,
            "relu", "relu", True, "simt")
    torch.library.opcheck(conv_ops._fused_conv2d_op.op, args)


# ---------------------------------------------------------------------------------------------
# the kernels under AddressSanitizer and UBSan (csrc/tests/conv_selftest.cpp, outside Python)
# ---------------------------------------------------------------------------------------------

# Relative L2 error bounds. fp32 results: fp32 accumulation over <= 12 products. 16-bit
# outputs (forward, input grad) are rounded to the dtype once: within its unit roundoff u
# (2^-11 half, 2^-8 bfloat16) of the exact value, so 2u; the channel statistics and the
# weight-grad partials stay fp32.
SELFTEST_BOUNDS = {
    "float32": dict(forward=1e-5, mean=1e-5, var=1e-5, input_grad=1e-5, weight_grad=1e-5),
    "float16": dict(forward=2 * 2.0 ** -11, mean=1e-5, var=1e-5, input_grad=2 * 2.0 ** -11,
                    weight_grad=1e-5),
    "bfloat16": dict(forward=2 * 2.0 ** -8, mean=1e-5, var=1e-5, input_grad=2 * 2.0 ** -8,
                     weight_grad=1e-5),
}
for _bounds in SELFTEST_BOUNDS.values():  # without prologue/epilogue: same output precisions
    _bounds.update(forward_plain=_bounds["forward"], weight_grad_plain=_bounds["weight_grad"])


@pytest.fixture(scope="module")
def conv_selftest(tmp_path_factory) -> Path:
    return build_sanitized_selftest(CSRC / "tests" / "conv_selftest.cpp",
                                    tmp_path_factory.mktemp("conv") / "conv_selftest", "simt" in REQUIRED)


@pytest.mark.parametrize("shape", ["odd", "aligned"])  # the scalar and the 16-byte load paths
@pytest.mark.parametrize("dtype", list(SELFTEST_BOUNDS))
def test_kernels_under_sanitizers_match_the_reference(conv_selftest, dtype, shape):
    done = run_sanitized(conv_selftest, dtype, shape)
    assert done.returncode == 0, f"conv_selftest {dtype} {shape} failed:\n{done.stderr[-4000:]}"
    assert "runtime error" not in done.stderr, done.stderr[-4000:]  # UBSan
    errors = dict(line.split("=", 1) for line in done.stdout.split())
    assert errors.pop("vectorized") == ("1" if shape == "aligned" else "0"), done.stdout
    assert set(errors) == set(SELFTEST_BOUNDS[dtype]), done.stdout
    for name, bound in SELFTEST_BOUNDS[dtype].items():
        assert float(errors[name]) <= bound, f"{dtype} {name}: relative error {errors[name]} > {bound}"
