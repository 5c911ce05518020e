# SPDX-License-Identifier: Apache-2.0
"""The per-channel glue of fused_conv2d's backward: the fused Triton passes
(packed_kernels/triton/conv_glue.py) against the torch glue they replace (ops/conv.py
_epilogue_glue / _prologue_glue), and fused_conv2d's backward end to end with the Triton glue
forced (conv_engines.FORCE_TRITON_GLUE; on the CPU it runs under Triton's interpreter)."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels._layouts import format_of
from packed_kernels.ops import conv_engines, conv_reference

from conftest import require_backend
from helpers import assert_all_finite, assert_close, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# (N, C, H, W): odd channels and maps, partial tiles on both layouts; the larger one spans
# several tiles per channel (NCHW: 2 n-blocks x 2 spatial blocks of 1024; channels_last: 12
# row tiles), so several splits and their ordered merge
SMALL, MULTI_TILE = (2, 5, 7, 9), (5, 3, 33, 35)
FP32_RTOL = 1e-5  # fp32 math both sides; only the summation order differs


@pytest.fixture
def glue_device():
    return require_backend("triton")


def _randn(shape, dtype, fmt, device):
    return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)


def _compare(ours, theirs, reference, dtype, what):
    """fp32: ours vs the torch glue; 16-bit: both vs the fp64 glue (tests/helpers)."""
    if ours is None or theirs is None:
        assert ours is None and theirs is None, f"{what}: present in one glue only"
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    if ours.dim() == 4:
        assert format_of(ours) == format_of(theirs), f"{what}: memory format"
    assert_all_finite(ours)
    if dtype == torch.float32:
        assert relative_error(ours, theirs) <= FP32_RTOL, what
    else:
        assert_close(ours, reference, theirs, dtype, what)


# relu, out_scale, channel_stats, residual, sums needed (bias or out_shift)
EPILOGUES = {
    "plain": (False, False, False, False, True),
    "relu": (True, False, False, False, True),
    "relu_residual": (True, False, False, True, False),
    "scale_residual": (False, True, False, True, True),
    "stats_only": (False, False, True, False, True),
    "everything": (True, True, True, True, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("options", EPILOGUES)
def test_epilogue_glue_matches_torch(options, layout, dtype, glue_device):
    from packed_kernels.triton import conv_glue

    relu, has_scale, stats, has_residual, need_sums = EPILOGUES[options]
    fmt, device = FORMATS[layout], glue_device
    shape = MULTI_TILE if options == "everything" and dtype == torch.float32 else SMALL
    channels = shape[1]
    grad_out, out, y = (_randn(shape, dtype, fmt, device) for _ in range(3))
    # the residual in the other layout: its gradient keeps the residual's
    other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
    residual = _randn(shape, dtype, other, device) if has_residual else None
    out_scale = torch.randn(channels, device=device) if has_scale else None  # fp32, folded BN
    # |mean| >> std: the centring must subtract the channel's mean accurately
    grad_stats = torch.randn(2, channels, device=device) if stats else None
    y = y + 20 * torch.randn(channels, device=device).to(dtype).view(1, -1, 1, 1) if stats else y

    ours = conv_glue.epilogue_backward(grad_out, out, y, out_scale, grad_stats, residual, relu, need_sums)
    activation = "relu" if relu else None
    theirs = conv_reference.epilogue_glue(grad_out, out, y, out_scale, grad_stats, residual, activation, dtype)
    wide = [None if t is None else t.double() for t in (grad_out, out, y, out_scale, grad_stats, residual)]
    reference = conv_reference.epilogue_glue(*wide, activation, torch.float64)
    names = ("grad_y", "grad_residual", "sum grad_y", "sum grad_z*y", "sum grad_z")
    for index, name in enumerate(names):
        if ours[index] is None and index in (2, 4) and not need_sums:
            continue  # skipped: nothing consumes it
        _compare(ours[index], theirs[index], reference[index], dtype, f"{options} {name}")


# in_activation relu, in_scale, in_shift
PROLOGUES = {
    "none": (False, False, False),
    "relu": (True, False, False),
    "shift": (False, False, True),
    "scale": (False, True, False),
    "everything": (True, True, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("options", PROLOGUES)
def test_prologue_glue_matches_torch(options, layout, dtype, glue_device):
    from packed_kernels.triton import conv_glue

    relu, has_scale, has_shift = PROLOGUES[options]
    fmt, device = FORMATS[layout], glue_device
    shape = MULTI_TILE if options == "everything" and dtype == torch.float32 else SMALL
    channels = shape[1]
    grad_x_hat, x = _randn(shape, dtype, fmt, device), _randn(shape, dtype, fmt, device)
    in_scale = torch.randn(channels, device=device) if has_scale else None
    # vectors in the activations' dtype too (not only fp32 folded statistics)
    in_shift = torch.randn(channels, device=device).to(dtype) if has_shift else None

    ours = conv_glue.prologue_backward(grad_x_hat, x, in_scale, in_shift, relu)
    theirs = conv_reference.prologue_glue(grad_x_hat, x, in_scale, in_shift, relu)
    wide = [None if t is None else t.double() for t in (grad_x_hat, x, in_scale, in_shift)]
    reference = conv_reference.prologue_glue(*wide, relu)
    for index, name in enumerate(("grad_input", "sum grad_u*x", "sum grad_u")):
        _compare(ours[index], theirs[index], reference[index], dtype, f"{options} {name}")


def test_glue_selection(monkeypatch):
    """The Triton glue only where Triton runs: CUDA tensors, or forced (the interpreter)."""
    cpu = torch.empty(1)
    monkeypatch.setattr(conv_engines, "FORCE_TRITON_GLUE", False)
    assert not conv_engines.use_triton_glue(cpu)
    assert not conv_engines.use_triton_glue(cpu.double())
    monkeypatch.setattr(conv_engines, "FORCE_TRITON_GLUE", True)
    expected = pk._backend.unavailable_reason("triton", cpu.device, cpu.dtype) is None
    assert conv_engines.use_triton_glue(cpu) == expected
    assert not conv_engines.use_triton_glue(cpu.double())  # the kernels take fp32/fp16/bf16


def _reference_fused(x, w, b, in_scale, in_shift, out_scale, out_shift, residual, padding):
    """fused_conv2d's math in plain torch ops (differentiable): out, mean, var."""
    x_hat = torch.relu(x * in_scale.view(1, -1, 1, 1) + in_shift.view(1, -1, 1, 1))
    y = F.conv2d(x_hat, w, b, padding=padding)
    var, mean = torch.var_mean(y, (0, 2, 3), correction=0)
    out = torch.relu(y * out_scale.view(1, -1, 1, 1) + out_shift.view(1, -1, 1, 1) + residual)
    return out, mean, var


# (layout, dtype, conv backend): the torch convs everywhere; the Triton convs (under the
# interpreter on the CPU: slow, so once) hand the glue y's fused mean from the recompute
END_TO_END = [(layout, dtype, "torch") for layout in FORMATS for dtype in DTYPES] + [
    ("channels_last", torch.float32, "triton")]


@pytest.mark.parametrize("layout, dtype, backend", END_TO_END, ids=str)
def test_fused_conv2d_backward_with_triton_glue(layout, dtype, backend, glue_device, monkeypatch):
    """Every tensor argument's gradient through torch.autograd, all options on, the Triton glue
    forced, against fp64 autograd of the same math (and torch's own error at `dtype`)."""
    require_backend(backend, dtype)
    from packed_kernels.triton import conv_glue

    calls = []
    for name in ("epilogue_backward", "prologue_backward", "channel_mean"):
        original = getattr(conv_glue, name)
        monkeypatch.setattr(conv_glue, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setattr(conv_engines, "FORCE_TRITON_GLUE", True)
    fmt, device = FORMATS[layout], glue_device
    n, c_in, c_out, size = 2, 3, 5, 7
    leaves = {
        "input": torch.randn(n, c_in, size, size).contiguous(memory_format=fmt),
        "weight": torch.randn(c_out, c_in, 3, 3) / 5,
        "bias": torch.randn(c_out),
        "in_scale": torch.randn(c_in), "in_shift": torch.randn(c_in),
        "out_scale": torch.randn(c_out), "out_shift": torch.randn(c_out),
        "residual": torch.randn(n, c_out, size, size).contiguous(memory_format=fmt),
    }
    activations = ("input", "weight", "bias", "residual")  # in `dtype`; the vectors stay fp32
    grads_out = [torch.randn(n, c_out, size, size), torch.randn(c_out), torch.randn(c_out)]

    def run(kind):
        """kind: 'ours' (fused_conv2d, glue forced), 'torch' (the same math at dtype), 'fp64'."""
        wide = kind == "fp64"
        params = {k: (v.double() if wide else v.to(dtype) if k in activations else v)
                  .to(device).detach().clone().requires_grad_() for k, v in leaves.items()}
        if kind == "ours":
            results = pk.fused_conv2d(
                params["input"], params["weight"], params["bias"], padding=1,
                in_scale=params["in_scale"], in_shift=params["in_shift"], in_activation="relu",
                out_scale=params["out_scale"], out_shift=params["out_shift"],
                residual=params["residual"], activation="relu", channel_stats=True, backend=backend)
        else:
            cast = {k: (v if wide or k in activations else v.to(dtype)) for k, v in params.items()}
            results = _reference_fused(cast["input"], cast["weight"], cast["bias"], cast["in_scale"],
                                       cast["in_shift"], cast["out_scale"], cast["out_shift"],
                                       cast["residual"], 1)
        torch.autograd.backward(results, [g.to(device).to(r.dtype) for g, r in zip(grads_out, results)])
        return {k: v.grad for k, v in params.items()}

    ours, reference = run("ours"), run("fp64")
    # the centring mean: a sum pass behind the torch convs, the Triton convs' fused statistic
    expected = ["epilogue_backward", "prologue_backward"] + (["channel_mean"] if backend == "torch" else [])
    assert sorted(set(calls)) == sorted(expected)
    theirs = run("torch") if dtype != torch.float32 else None
    for name, grad in ours.items():
        assert grad.dtype == leaves[name].to(dtype if name in activations else torch.float32).dtype, name
        assert_all_finite(grad)
        if grad.dim() == 4 and name != "weight":
            assert format_of(grad) == fmt, f"{name}: memory format"
        if dtype == torch.float32:
            assert relative_error(grad, reference[name]) <= FP32_RTOL, name
        else:
            assert_close(grad, reference[name], theirs[name], dtype, name)
