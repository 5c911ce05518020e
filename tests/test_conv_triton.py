# SPDX-License-Identifier: Apache-2.0
"""Triton grouped convolution (packed_kernels.triton.conv) and fused_conv2d.

Every result is judged against torch in float64 on the CPU (F.conv2d with the user's own
arguments, so our geometry code is checked too), low precision against torch's own error at
that precision (tests/helpers.py). Without a GPU the kernels run under Triton's interpreter:
shapes are tiny, but odd, and chosen so every code path (several K chunks, several column
tiles, split weight-grad, masked taps) runs."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels import _backend
from packed_kernels.ops import conv as conv_ops
from packed_kernels.triton import conv as tc
from packed_kernels.triton import conv_tuning

from conftest import require_backend
from conv_cases import (CASES, FUSED_CASES, OPTION_SETS, check_fused_matches_fp64,
                        fused_inputs, make_case, run_with_grads)
from helpers import assert_all_finite, assert_close, relative_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    monkeypatch.setenv("PACKED_KERNELS_AUTOTUNE", "0")


# Both layouts in fp32; the 16-bit types one layout each (the kernels read the layout through
# strides, independent of the dtype), to stay inside the interpreter's CI budget.
DTYPE_LAYOUTS = [(torch.float32, "nchw"), (torch.float32, "channels_last"),
                 (torch.float16, "channels_last"), (torch.bfloat16, "nchw")]


@pytest.mark.parametrize("dtype, layout", DTYPE_LAYOUTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name", list(CASES))
def test_grouped_conv2d_matches_fp64(name, dtype, layout):
    device = require_backend("triton", dtype)
    x, w, b, args = make_case(CASES[name], dtype, device, layout)
    grad_seed = torch.randn(F.conv2d(x.cpu().double(), w.cpu().double(), None, **args).shape)

    ours, ours_grads = run_with_grads(lambda *t: pk.grouped_conv2d(*t, **args, backend="triton"),
                              (x, w, b), grad_seed)
    ref, ref_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x.cpu().double(), w.cpu().double(),
                                                             b.cpu().double()), grad_seed)
    lowp, lowp_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x.cpu(), w.cpu(), b.cpu()), grad_seed)

    assert ours.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert_all_finite(ours, *ours_grads)
    assert_close(ours, ref, lowp, dtype, f"{name} forward")
    for what, g, r, t in zip(("input", "weight", "bias"), ours_grads, ref_grads, lowp_grads):
        assert_close(g, r, t, dtype, f"{name} grad {what}")
    assert ours_grads[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["pe_3x3_3ch_per_group", "dense_multi_chunk_multi_tile"])
def test_float32_follows_torch_tf32_switch(name):
    """With torch.backends.cudnn.allow_tf32 (torch's default) fp32 convs may run on TF32
    tensor cores, as cuDNN's do; without it they are exact to float32 rounding."""
    device = require_backend("triton")
    x, w, b, args = make_case(CASES[name], torch.float32, device, "channels_last")
    grad_seed = torch.randn(F.conv2d(x.cpu().double(), w.cpu().double(), None, **args).shape)
    ref, ref_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x.cpu().double(), w.cpu().double(),
                                                             b.cpu().double()), grad_seed)
    errors = {}
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32  # conftest restores it
        out, grads = run_with_grads(lambda *t: pk.grouped_conv2d(*t, **args, backend="triton"),
                                    (x, w, b), grad_seed)
        errors[tf32] = max(relative_error(t, r) for t, r in zip((out, *grads), (ref, *ref_grads)))
    # TF32 keeps 10 mantissa bits: each product is off by up to 2 * 2^-11 ~ 1e-3 relative and
    # random-sign sums keep the result's error at that order; float32 stays near 1e-6
    assert errors[False] < 1e-5
    assert 1e-5 < errors[True] < 2e-3  # the TF32 path really ran, within TF32's rounding


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_non_contiguous_input_and_grad(dtype):
    device = require_backend("triton", dtype)
    x, w, b, args = make_case(CASES["3x3_s2_odd_batch1"], dtype, device, "strided")
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    ours = pk.grouped_conv2d(x, w, b, **args, backend="triton")
    ref = F.conv2d(x.cpu().double(), w.cpu().double(), b.cpu().double(), **args)
    assert_close(ours, ref, F.conv2d(x.cpu(), w.cpu(), b.cpu(), **args), dtype, "strided forward")
    # a non-contiguous upstream gradient (a transposed view) through the launchers directly
    grad = torch.randn(ref.shape[0], ref.shape[1], ref.shape[3], ref.shape[2], dtype=dtype).transpose(2, 3)
    geometry = ((2, 2), (1, 1, 1, 1), (1, 1), args["groups"])
    grad_x = tc.conv_input_grad(grad.to(device), w, x.shape, *geometry)
    grad_w = tc.conv_weight_grad(grad.to(device), x, w.shape, *geometry)
    ref_x, ref_w, _ = torch.ops.aten.convolution_backward(
        grad.double(), x.cpu().double(), w.cpu().double(), None, [2, 2], [1, 1], [1, 1], False,
        [0, 0], args["groups"], [True, True, False])
    low_x, low_w, _ = torch.ops.aten.convolution_backward(
        grad, x.cpu(), w.cpu(), None, [2, 2], [1, 1], [1, 1], False, [0, 0], args["groups"],
        [True, True, False])
    assert_close(grad_x, ref_x, low_x, dtype, "strided input grad")
    assert_close(grad_w, ref_w, low_w, dtype, "strided weight grad")


def _check_conv_and_grads(x, w, args, dtype, what):
    """Forward and both gradients of pk.grouped_conv2d (Triton) against F.conv2d in fp64."""
    device = require_backend("triton", dtype)
    x, w = x.to(dtype), w.to(dtype)
    grad_seed = torch.randn(F.conv2d(x.double(), w.double(), None, **args).shape)
    ours, ours_grads = run_with_grads(lambda *t: pk.grouped_conv2d(*t, **args, backend="triton"),
                                      (x.to(device), w.to(device)), grad_seed)
    ref, ref_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x.double(), w.double()), grad_seed)
    low, low_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x, w), grad_seed)
    assert_close(ours, ref, low, dtype, f"{what} forward")
    for name, g, r, t in zip(("input", "weight"), ours_grads, ref_grads, low_grads):
        assert_close(g, r, t, dtype, f"{what} grad {name}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_whole_channel_blocks_across_taps_and_stride_phases(dtype):
    """Channels per group that the K tile divides (the unmasked channel blocks), several blocks
    per tap, stride 2 with odd maps (phases of unequal size)."""
    x = torch.randn(2, 64, 7, 6).to(memory_format=torch.channels_last)
    w = torch.randn(32, 32, 3, 3) / 17
    _check_conv_and_grads(x, w, dict(stride=2, padding=1, groups=2), dtype, "32 per group, s2")


@pytest.mark.parametrize("geometry", [
    dict(kernel=(5, 3), stride=(3, 2), padding=(4, 1), dilation=(2, 1)),  # tap step 3 along h
    dict(kernel=(2, 4), stride=(2, 3), padding=(0, 2), dilation=(2, 3)),  # phases no tap reaches
    dict(kernel=(1, 1), stride=(3, 2), padding=(0, 0), dilation=(1, 1)),  # strided 1x1
], ids=["step3", "untouched_phases", "1x1_s3x2"])
def test_input_grad_stride_phases(geometry):
    """The input gradient visits, per stride phase, only the taps that reach it; phases that no
    tap reaches (stride and dilation sharing a factor) get zeros."""
    kernel = geometry.pop("kernel")
    x = torch.randn(2, 6, 11, 10).to(memory_format=torch.channels_last)
    w = torch.randn(4, 3, *kernel)
    _check_conv_and_grads(x, w, dict(geometry, groups=2), torch.float32, str(geometry))


def test_weight_grad_pixel_tiles_span_images():
    """Weight-gradient K tiles spanning several whole images of a small map (2x3 outputs),
    with the pixel range split."""
    x = torch.randn(20, 8, 4, 6).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3) / 6
    _check_conv_and_grads(x, w, dict(stride=2, padding=1, groups=2), torch.float32, "2x3 maps")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_unaligned_channel_runs_on_the_wide_tile(dtype):
    """Channel runs that are not 16-byte vectors on either side (3 input channels and 78
    outputs; 18 per group) with a group wider than 16 channels: in 16-bit types the forward (78
    outputs) and the input gradient (18 inputs per group) run the 64x64 unaligned tile (fp32
    keeps 16x16: 64x64 spills there)."""
    wide = dtype != torch.float32
    assert conv_tuning.heuristic("forward", dtype, 10_000, 78, 3, aligned=False).block_n == (64 if wide else 16)
    x = torch.randn(2, 3, 9, 7).to(memory_format=torch.channels_last)
    _check_conv_and_grads(x, torch.randn(78, 3, 3, 3) / 5, dict(padding=1), dtype, "stem-like")
    x = torch.randn(2, 36, 6, 5).to(memory_format=torch.channels_last)
    _check_conv_and_grads(x, torch.randn(6, 18, 3, 3) / 12, dict(padding=1, groups=2), dtype,
                          "18 per group")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_stem_weight_grad_with_vector_output_channels(dtype):
    """The stem's weight gradient (3 input channels, not 16-byte runs; 128 output channels,
    16-byte runs): the gradient loads as vectors, one 128-row tile over all output channels
    (not on FMAs: fp32 without TF32 keeps its small tiles); through an input prologue too
    (read as act(x * scale + shift), padding zero after it)."""
    fma = conv_tuning.input_precision(dtype) == "ieee" and dtype == torch.float32
    assert (conv_tuning.heuristic("weight_grad", dtype, 128, 3, 9 * 81, aligned=False,
                                  vector_out=True)[:2] == (128, 16)) != fma
    assert conv_tuning.heuristic("weight_grad", dtype, 128, 3, 9 * 81, aligned=False)[:2] != (128, 16)
    x = torch.randn(3, 3, 9, 9).to(memory_format=torch.channels_last)
    _check_conv_and_grads(x, torch.randn(128, 3, 3, 3) / 5, dict(padding=1), dtype, "stem")
    device = require_backend("triton", dtype)
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    grad = torch.randn(3, 128, 9, 9).to(memory_format=torch.channels_last)
    ours = tc.conv_weight_grad(grad.to(device, dtype), x.to(device, dtype), (128, 3, 3, 3), (1, 1),
                               (1, 1, 1, 1), (1, 1), 1,
                               tc.Prologue(scale.to(device, dtype), shift.to(device, dtype), "relu"))

    def reference(t):
        x_hat = torch.relu(x.to(t) * scale.to(t)[:, None, None] + shift.to(t)[:, None, None])
        return torch.nn.grad.conv2d_weight(x_hat, (128, 3, 3, 3), grad.to(t), padding=1)
    assert_close(ours.cpu(), reference(torch.float64), reference(dtype), dtype, "stem with prologue")


def _record_vectors(monkeypatch, kernel_name: str) -> list:
    """(VEC, VEC_OUT, BLOCK_M, BLOCK_N) of every launch of tc.<kernel_name> from now on (it
    still runs)."""
    launches, kernel = [], getattr(tc, kernel_name)

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(tuple(kwargs[k] for k in ("VEC", "VEC_OUT", "BLOCK_M", "BLOCK_N")))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tc, kernel_name, Recording())
    return launches


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_stem_with_vector_output_channels(dtype, monkeypatch):
    """The stem's forward and input gradient (3 input channels per group, element by element;
    16-byte runs of output channels: the forward's weight rows and output, the input
    gradient's K axis, load and store as vectors) on their own tiles: ImageNet's 7x7 stride-2
    stem (stride phases), groups of 24 output channels (a masked K block in the input
    gradient), every fusion hook. A gradient whose channel runs are not 16-byte aligned loads
    element by element."""
    vec = 16 // dtype.itemsize
    fma = conv_tuning.input_precision(dtype) == "ieee" and dtype == torch.float32
    assert conv_tuning.heuristic("input_grad", dtype, 10_000, 3, 128, aligned=False,
                                 vector_out=True)[:2] == (128, 16)
    assert conv_tuning.heuristic("forward", dtype, 10_000, 128, 3, aligned=False,
                                 vector_out=True)[:2] == ((64, 64) if fma else (128, 128))
    forwards = _record_vectors(monkeypatch, "_conv_forward_kernel")
    input_grads = _record_vectors(monkeypatch, "_conv_input_grad_kernel")
    x = torch.randn(2, 3, 13, 11).to(memory_format=torch.channels_last)
    _check_conv_and_grads(x, torch.randn(64, 3, 7, 7) / 10, dict(stride=2, padding=3), dtype,
                          "7x7 stem")
    x = torch.randn(2, 6, 9, 7).to(memory_format=torch.channels_last)
    _check_conv_and_grads(x, torch.randn(48, 3, 3, 3) / 5, dict(padding=1, groups=2), dtype,
                          "24 outputs per group")
    assert [v[:2] for v in forwards + input_grads] == [(1, vec)] * 4
    assert {v[2:] for v in input_grads} == {(128, 16)}
    check_fused_matches_fp64("triton", "everything", dtype, "channels_last",
                             (2, 3, 16, (7, 6), 3, 1, 1, 1, 1))
    assert forwards[-1][:2] == (1, vec)
    device = require_backend("triton", dtype)
    wide = torch.randn(2, 129, 9, 7).to(device, dtype, memory_format=torch.channels_last)
    grad = wide[:, 1:]  # channel stride 1, every run one element past a 16-byte boundary
    w = torch.randn(128, 3, 3, 3) / 5
    ours = tc.conv_input_grad(grad, w.to(device, dtype), (2, 3, 9, 7), (1, 1), (1, 1, 1, 1),
                              (1, 1), 1)
    assert input_grads[-1][:2] == (1, 1)

    def reference(t):
        return torch.nn.grad.conv2d_input((2, 3, 9, 7), w.to(t), grad.cpu().to(t), padding=1)
    assert_close(ours.cpu(), reference(torch.float64), reference(dtype), dtype, "unaligned grad")


def _record_weight_grad_grids(monkeypatch) -> list:
    """The grids the weight-gradient kernel launches on from now on (it still runs)."""
    grids, kernel = [], tc._conv_weight_grad_kernel

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tc, "_conv_weight_grad_kernel", Recording())
    return grids


def test_weight_grad_runs_of_positions_launched_in_batches(monkeypatch):
    """A map with many runs of positions (one fp32 slab each) under a small grid limit: the
    runs go out in several launches whose sums add up to the whole gradient."""
    launches = _record_weight_grad_grids(monkeypatch)
    monkeypatch.setattr(tc, "MAX_GRID_Y", 2 * 9)  # two runs of positions per launch of a 3x3
    x = torch.randn(2, 8, 12, 11).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3) / 6
    _check_conv_and_grads(x, w, dict(stride=1, padding=1, groups=2), torch.float32, "batched runs")
    assert len(launches) == 3  # 132 positions in runs of 32: 5 runs, 2 per launch


def test_weight_grad_splits_past_the_slab_cap_only_where_compute_bound(monkeypatch):
    """A 3x3 on an 8x8 map with 128 channels per group (36 programs of 128x128, its slabs over
    the partials' share) splits its images until the 132 SMs hold one program each; a 1x1 with
    as few programs (memory-bound) keeps the slab cap. A split past the cap sums to the right
    gradient."""
    monkeypatch.setattr(_backend, "multiprocessors", lambda device: 132)
    tile = conv_tuning.TileConfig(128, 128, 64, 8, 2)

    def split(weight_shape, groups, c_in, c_out, positions):
        activation_bytes = 2 * 128 * positions * (c_in + c_out)  # fp16, stride 1
        return tc.weight_grad_split(tile, weight_shape, groups, 128, positions, activation_bytes,
                                    torch.device("cpu"))

    deep = split((512, 128, 3, 3), 4, 512, 512, 64)
    assert (deep.splits_n, deep.split_n) == (3, 43)  # 108 programs: one wave of 132 SMs
    assert split((4096, 256, 1, 1), 4, 1024, 4096, 16).splits_n == 1
    # small enough for the interpreter: 9 programs on 40 SMs, 72 flops per activation byte
    monkeypatch.setattr(_backend, "multiprocessors", lambda device: 40)
    monkeypatch.setattr(tc, "COMPUTE_BOUND_INTENSITY", 64)
    grids = _record_weight_grad_grids(monkeypatch)
    x = torch.randn(48, 32, 3, 3).to(memory_format=torch.channels_last)
    w = torch.randn(32, 32, 3, 3) / 20
    assert int(tc.PARTIALS_SHARE * 2 * x.numel() * 4) // (8 * w.numel()) == 0  # the cap: no split
    _check_conv_and_grads(x, w, dict(padding=1), torch.float32, "split past the slab cap")
    assert grids == [(1, 9 * 4, 1)]  # 4 slabs of the 9 taps: 36 programs on 40 SMs


def test_input_grad_grid_limit_raises_before_launch():
    """Groups x stride phases share grid axis z: past CUDA's limit a clear error, no launch."""
    grad, weight = torch.empty(1, 20000, 2, 2), torch.empty(20000, 1, 1, 1)
    with pytest.raises(ValueError, match=r"groups \(20000\) x stride phases \(2 x 2\)"):
        tc.conv_input_grad(grad, weight, (1, 20000, 4, 4), (2, 2), (0, 0, 0, 0), (1, 1), 20000)


# ---------------------------------------------------------------------------------------------
# fused_conv2d
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, dtype", FUSED_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_fused_conv2d_matches_fp64(options, dtype):
    check_fused_matches_fp64("triton", options, dtype, "nchw" if dtype == torch.bfloat16 else "channels_last")


def test_fused_conv2d_stats_grad_only():
    """Gradient flowing only through the channel statistics (what BatchNorm training does)."""
    device = require_backend("triton")
    x, w, b, _, args = fused_inputs(torch.float32, device, "nchw", {}, "3x3_s2_odd_batch1")
    xs = [t.clone().requires_grad_() for t in (x, w)]
    _, mean, var = pk.fused_conv2d(*xs, None, **args, channel_stats=True, backend="triton")
    (mean.sum() + 0.5 * var.sum()).backward()
    refs = [t.cpu().double().requires_grad_() for t in (x, w)]
    ref_var, ref_mean = torch.var_mean(F.conv2d(*refs, None, **args), (0, 2, 3), correction=0)
    (ref_mean.sum() + 0.5 * ref_var.sum()).backward()
    for ours, ref in zip(xs, refs):
        assert_close(ours.grad, ref.grad, ours.grad, torch.float32, "stats-only grad")


def test_fused_conv2d_gradcheck_torch_reference():
    """The closed-form fused backward (shared by every backend) against finite differences."""
    torch.manual_seed(1)
    opts = OPTION_SETS["everything"]
    x, w, b, tensors, args = fused_inputs(torch.float64, torch.device("cpu"), "nchw", opts,
                                           "3x3_s2_odd_batch1")
    x = x[:, :4, :5, :5].contiguous()
    w = w[:4, :2].contiguous()
    b = b[:4].contiguous()
    out_shape = F.conv2d(x, w, None, **args).shape
    tensors = dict(in_scale=tensors["in_scale"][:4], in_shift=tensors["in_shift"][:4],
                   out_scale=tensors["out_scale"][:4], out_shift=tensors["out_shift"][:4],
                   residual=torch.randn(out_shape, dtype=torch.float64))
    names = list(tensors)

    def fn(x, w, b, *rest):
        return pk.fused_conv2d(x, w, b, **args, **dict(zip(names, rest)), in_activation="relu",
                               activation="relu", channel_stats=True, backend="torch")
    inputs = [t.clone().requires_grad_() for t in [x, w, b, *tensors.values()]]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_padding_is_applied_after_the_prologue():
    """conv(relu(x*s+b)) zero-pads the transformed map: with shift > 0 a wrong order shows."""
    device = require_backend("triton")
    x = torch.randn(1, 2, 5, 5).to(device)
    w = torch.ones(2, 2, 3, 3).to(device)
    shift = torch.full((2,), 3.0).to(device)
    ours = pk.fused_conv2d(x, w, padding=1, in_shift=shift, in_activation="relu", backend="triton")
    ref = F.conv2d(torch.relu(x.cpu().double() + 3.0), w.cpu().double(), padding=1)
    assert_close(ours, ref, ours, torch.float32, "padding after prologue")


# ---------------------------------------------------------------------------------------------
# bad input, backend choice, ops registration
# ---------------------------------------------------------------------------------------------

def _good():
    return torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3)


@pytest.mark.parametrize("fn", [pk.grouped_conv2d, pk.fused_conv2d], ids=["grouped", "fused"])
@pytest.mark.parametrize("bad, error, match", [
    (lambda x, w: (x, w.to("meta"), {}), ValueError, "device"),
    (lambda x, w: (x, w.half(), {}), TypeError, "mixed dtypes"),
    (lambda x, w: (x, w, {"groups": 3}), ValueError, "divisible by groups"),
    (lambda x, w: (x, w[:, :1], {}), ValueError, "expects"),
    (lambda x, w: (x.int(), w.int(), {}), TypeError, "floating-point"),
    (lambda x, w: (x[0], w, {}), ValueError, "4 dimensions"),
    (lambda x, w: (x, w, {"padding": "same", "stride": 2}), ValueError, "same"),
    (lambda x, w: (x, w, {"bias": torch.randn(5)}), ValueError, "bias"),
    (lambda x, w: (x, w, {"stride": 1.0}), TypeError, "stride must be an int or a pair"),
    (lambda x, w: (x, w, {"padding": 0.5}), TypeError, "padding must be an int or a pair"),
])
def test_bad_input_raises_before_launch(fn, bad, error, match):
    x, w = _good()
    x, w, kwargs = bad(x, w)
    kwargs.setdefault("groups", 2)
    with pytest.raises(error, match=match):
        fn(x, w, **kwargs, backend="triton")


@pytest.mark.parametrize("fn", [pk.grouped_conv2d, pk.fused_conv2d], ids=["grouped", "fused"])
@pytest.mark.parametrize("stride", [1.0, True, (1, True), [1, 1.0]])
def test_remembered_valid_calls_do_not_admit_equal_values_of_other_types(fn, stride, call_keys):
    """Repeated valid calls skip the checks; 1.0 or True, equal to 1 and hashed alike, still fail."""
    x, w = _good()
    fn(x, w, groups=2, stride=1)
    fn(x, w, groups=2, stride=[1, 1])
    with pytest.raises((TypeError, ValueError), match="stride"):
        fn(x, w, groups=2, stride=stride)


@pytest.mark.parametrize("fn", [pk.grouped_conv2d, pk.fused_conv2d], ids=["grouped", "fused"])
def test_remembered_valid_calls_check_groups_type_and_tensor_arguments(fn, call_keys):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    fn(x, w, groups=1)
    with pytest.raises(TypeError, match="groups"):
        fn(x, w, groups=True)
    with pytest.raises(TypeError, match="input"):
        fn(x.numpy(), w, groups=1)  # shaped like a tensor, but not one


def test_remembered_fused_calls_check_option_types(call_keys):
    x, w = _good()
    pk.fused_conv2d(x, w, groups=2, channel_stats=True)
    with pytest.raises(TypeError, match="channel_stats"):
        pk.fused_conv2d(x, w, groups=2, channel_stats=1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(in_scale=torch.randn(3)), ValueError, "in_scale"),
    (dict(out_shift=torch.randn(4)), ValueError, "out_shift"),
    (dict(in_shift=torch.randn(4).half()), TypeError, "mixed dtypes"),
    (dict(residual=torch.randn(1, 6, 5, 5)), ValueError, "residual"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(in_activation="tanh"), ValueError, "in_activation"),
    (dict(channel_stats=1), TypeError, "channel_stats"),
])
def test_fused_bad_options_raise(kwargs, error, match):
    x, w = _good()
    with pytest.raises(error, match=match):
        pk.fused_conv2d(x, w, groups=2, **kwargs, backend="triton")


def test_backend_choice():
    x, w = _good()
    assert conv_ops.choose_backend("grouped_conv2d", None, x, w, (1, 1), 2) == "torch"  # CPU: reference
    with pytest.raises(pk.BackendUnavailableError, match="cuda"):
        pk.grouped_conv2d(x, w, groups=2, backend="cuda")
    with pytest.raises(pk.BackendUnavailableError, match="float64"):
        pk.grouped_conv2d(x.double(), w.double(), groups=2, backend="triton")


def test_opcheck():
    device = require_backend("triton")
    x = torch.randn(1, 4, 4, 5, device=device)
    w = torch.randn(4, 2, 3, 3, device=device)
    vec = torch.rand(4, device=device) + 0.5
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 2)
    for backend in ("torch", "triton"):
        torch.library.opcheck(conv_ops._grouped_conv2d_op.op, (x, w, vec, *geometry, backend))
        args = (x.requires_grad_(), w, vec, vec, vec, vec, vec, torch.randn(1, 4, 4, 5, device=device),
                *geometry, "relu", "relu", True, backend)
        torch.library.opcheck(conv_ops._fused_conv2d_op.op, args)
        x = x.detach()


# ---------------------------------------------------------------------------------------------
# tile configs and autotuning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tf32", [(torch.float32, True), (torch.float32, False),
                                         (torch.float16, False), (torch.bfloat16, False)], ids=str)
def test_heuristic_picks_only_compiled_configs(dtype, tf32):
    torch.backends.cudnn.allow_tf32 = tf32  # fp32 without TF32 (ieee) has its own list; conftest restores it
    kernels = {"forward": tc._conv_forward_kernel, "input_grad": tc._conv_input_grad_kernel,
               "weight_grad": tc._conv_weight_grad_kernel}
    names = {v: k for k, v in kernels.items()}
    compiled = {(names[c.kernel], c.signature["x_ptr" if "x_ptr" in c.signature else "g_ptr"],
                 c.constexprs["INPUT_PRECISION"], c.constexprs["VEC"], c.constexprs["BLOCK_M"],
                 c.constexprs["BLOCK_N"], c.constexprs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in tc.compile_cases()}
    short = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    precision = tc.input_precision(dtype)
    assert precision == ("tf32" if dtype == torch.float32 and tf32 else "ieee")
    for kernel in conv_tuning.KERNELS:
        for aligned in (True, False):
            vec = 16 // dtype.itemsize if aligned else 1
            pool = conv_tuning.candidates(kernel, dtype, aligned)
            assert pool
            for candidate in pool:
                assert (kernel, short, precision, vec, *candidate) in compiled
            for cols in (1, 3, 16, 17, 32, 48, 64, 100, 128, 512, 1024):
                for depth in (1, 3, 16, 24, 32, 64, 256, 100_000):
                    config = conv_tuning.heuristic(kernel, dtype, 100_000, cols, depth, aligned)
                    assert config in pool
                    if kernel != "weight_grad":  # the smallest listed column tile covering the group
                        widths = sorted({c.block_n for c in pool})
                        covering = [b for b in widths if b >= min(cols, widths[-1])]
                        assert config.block_n == covering[0]


def test_vector_width():
    """16-byte vector loads only where every channel run is 16-byte aligned."""
    x = torch.randn(2, 16, 5, 5, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert tc.vector_width(torch.float16, (8, 16), [(x, 1)]) == 8
    assert tc.vector_width(torch.float32, (8, 16), [(x.float(), 1)]) == 4
    assert tc.vector_width(torch.float16, (3, 16), [(x, 1)]) == 1  # 3 channels per group
    x12 = torch.randn(2, 12, 5, 5, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert tc.vector_width(torch.float16, (4, 4), [(x12, 1)]) == 1  # pixel stride 12: unaligned
    offset = torch.randn(2 * 16 * 25 + 1, dtype=torch.float16)[1:].view(2, 5, 5, 16).permute(0, 3, 1, 2)
    assert tc.vector_width(torch.float16, (8, 16), [(offset, 1)]) == 1  # misaligned base pointer
    # the grid above runs the vectorised path (aligned groups) as well as the scalar one
    n, c_in, c_out, *_ = CASES["dense_multi_chunk_multi_tile"]
    assert c_in % 8 == 0 and c_out % 8 == 0


def test_no_tuning_during_cuda_graph_capture(tmp_path, monkeypatch):
    """A shape first seen inside a CUDA-graph capture gets the heuristic without a benchmark
    (benchmarking synchronises, an error in a capture) and is not cached; a cached one is used."""
    monkeypatch.setenv("PACKED_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PACKED_KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(_backend, "device_name", lambda device: "capturing GPU")


    class CudaActivation:  # what pick() reads of a CUDA tensor, on a machine without one
        device, dtype = torch.device("cuda", 0), torch.float16

        def is_contiguous(self, memory_format=torch.contiguous_format):
            return memory_format == torch.contiguous_format

    x = CudaActivation()

    def no_benchmark(config):
        raise AssertionError("benchmarked during a capture")

    assert conv_tuning.pick("forward", x, 9, 64, 64, True, no_benchmark) == \
        conv_tuning.heuristic("forward", torch.float16, 9, 64, 64, True)
    assert conv_tuning.TUNING_CACHE.items() == []
    cached = conv_tuning.candidates("forward", torch.float16)[0]
    conv_tuning.TUNING_CACHE.put(conv_tuning.shape_class(
        "forward", torch.float16, "nchw", torch.device("cuda", 0), 9, 64, 64) + "|aligned=True",
        list(cached))
    assert conv_tuning.pick("forward", x, 9, 64, 64, True, no_benchmark) == cached


def test_tuning_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("PACKED_KERNELS_CACHE_DIR", str(tmp_path))
    config = conv_tuning.candidates("forward", torch.float16)[-1]
    key = conv_tuning.shape_class("forward", torch.float16, "nhwc", torch.device("cpu"), 5000, 64, 64)
    conv_tuning.TUNING_CACHE.put(key, list(config))
    reloaded = conv_tuning.JsonCache("conv_tuning")  # as a new process would read it
    assert conv_tuning.TileConfig(*reloaded.get(key)) == config
    assert (tmp_path / "conv_tuning.json").exists()
    # the CPU never autotunes, whatever the switch says: the heuristic answers
    monkeypatch.setenv("PACKED_KERNELS_AUTOTUNE", "1")
    x = torch.randn(1, 2, 3, 3, dtype=torch.float16)
    assert conv_tuning.pick("forward", x, 9, 64, 64, True, lambda c: 1 / 0) == \
        conv_tuning.heuristic("forward", torch.float16, 9, 64, 64, True)


# ---------------------------------------------------------------------------------------------
# every conv layer shape of the CIFAR Packed-Ensembles ResNets (small batch and map)
# ---------------------------------------------------------------------------------------------

def packed_resnet_conv_shapes(arch: int, gamma: int, image: int, width: float):
    """Distinct (c_in, c_out, (h, w), kernel, stride, padding, dilation, groups) of PE-(2, 4,
    gamma) CIFAR ResNet-`arch` at `width` x the channels, read off packed_kernels.models."""
    from packed_kernels.models.resnet import packed_resnet
    from packed_kernels.nn.packed import PackedConv2d

    # torch's BatchNorm2d: the unfused blocks call each PackedConv2d (the fused ones read its
    # weights into fused_conv2d without calling it, so the hooks below would see nothing)
    model = packed_resnet(3, 10, arch, num_estimators=4, alpha=2, gamma=gamma, style="cifar",
                          width_multiplier=width, normalization_layer=torch.nn.BatchNorm2d)
    shapes = {}

    def record(module, args):
        conv = module.conv
        shapes[(args[0].shape[1], conv.out_channels, tuple(args[0].shape[2:]), conv.kernel_size,
                conv.stride, conv.padding, conv.dilation, conv.groups)] = None
    for m in model.modules():
        if isinstance(m, PackedConv2d):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, image, image))
    return list(shapes)


def test_packed_resnet_layer_shapes():
    """Forward, input-grad and weight-grad of every distinct conv layer of PE-(2,4,1) and
    PE-(2,4,2) CIFAR ResNet-18 and ResNet-50, fp32 vs fp64. The interpreter cannot afford the
    real widths (up to 1024 channels per group: minutes per layer), so: an 8x8 image (maps
    8..1) and 1/8 of the channels; the layer structure (kernels, strides, groups, stem,
    downsampling) is the models' own. (At 1/8 width gamma=2 falls back to gamma=1, so the
    gamma=2 models add no new shapes; the grid above covers more groups per layer.)"""
    device = require_backend("triton")
    shapes = {}
    for arch in (18, 50):
        for gamma in (1, 2):
            shapes.update(dict.fromkeys(packed_resnet_conv_shapes(arch, gamma, 8, 0.125)))
    assert len(shapes) >= 25
    for c_in, c_out, hw, k, stride, padding, dilation, groups in shapes:
        args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        x = torch.randn(1, c_in, *hw).to(memory_format=torch.channels_last)
        w = torch.randn(c_out, c_in // groups, *k) / (c_in // groups * k[0] * k[1]) ** 0.5
        seed = torch.randn(F.conv2d(x.double(), w.double(), None, **args).shape)
        ours, ours_grads = run_with_grads(lambda *t: pk.grouped_conv2d(*t, **args, backend="triton"),
                                  (x.to(device), w.to(device)), seed)
        ref, ref_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x.double(), w.double()), seed)
        low, low_grads = run_with_grads(lambda *t: F.conv2d(*t, **args), (x, w), seed)
        what = f"{c_in}->{c_out} k{k} s{stride} g{groups} @{hw}"
        assert_close(ours, ref, low, torch.float32, what)
        for g, r, t in zip(ours_grads, ref_grads, low_grads):
            assert_close(g, r, t, torch.float32, what + " grad")
