# SPDX-License-Identifier: Apache-2.0
"""batch_norm (+ residual + ReLU): every backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels.ops import batch_norm as bn_ops

from batch_norm_cases import check_against_float64, leaves
from conftest import require_backend
from helpers import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]
# Tests that also run the CUDA C++ kernels (on the CPU through simt); the rest of the simt/cuda
# coverage is in tests/test_batch_norm_cuda.py.
ALL_BACKENDS = ["torch", "triton", "simt", "cuda"]
# name -> (shape, channels_last): odd sizes; NCHW, channels_last, 2-D, 3-D; batch 1; 1x1 maps
LAYOUTS = {
    "nchw": ((3, 5, 7, 3), False),
    "channels_last": ((2, 6, 3, 5), True),
    "2d": ((9, 7), False),
    "3d": ((2, 3, 11), False),
    "batch1": ((1, 4, 3, 3), True),
    "1x1": ((5, 3, 1, 1), False),
}


def _make(layout, dtype, device, mean=0.5, std=2.0):
    shape, channels_last = LAYOUTS[layout]
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    x = x.to(dtype).to(device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine, residual, relu", [(True, True, True), (False, False, False)])
def test_forward_backward_against_float64(backend, dtype, layout, training, affine, residual, relu):
    device = require_backend(backend, dtype)
    channels_last = LAYOUTS[layout][1]
    check_against_float64(backend, _make(layout, dtype, device),
                          torch.channels_last if channels_last else torch.contiguous_format,
                          training, affine, residual, relu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_parameters_with_half_input(backend):
    """Autocast-style: fp16 activations, fp32 affine parameters; gradients keep each dtype."""
    device = require_backend(backend, torch.float16)
    x = _make("channels_last", torch.float16, device).requires_grad_(True)
    w = torch.rand(x.shape[1], device=device).add_(0.5).requires_grad_(True)
    b = torch.randn(x.shape[1], device=device).requires_grad_(True)
    out = pk.batch_norm(x, None, None, w, b, True, activation="relu", backend=backend)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.randn_like(out))
    assert (out.dtype, gx.dtype, gw.dtype, gb.dtype) == (torch.float16, torch.float16, torch.float32,
                                                         torch.float32)
    x64, w64, b64 = leaves([x, w, b], torch.float64)
    ref = torch.relu(F.batch_norm(x64, None, None, w64, b64, True))
    low = torch.relu(F.batch_norm(x.detach().cpu().float(), None, None, w.detach().cpu(),
                                  b.detach().cpu(), True)).half()
    assert_close(out, ref, low, torch.float16, "out")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [1e4, -3e5])
def test_statistics_stable_for_large_means(backend, offset):
    """|mean| >> std: a naive fp32 sum/sum-of-squares loses every digit of the variance here
    (relative error > 1); ours must stay at float32 rounding level."""
    device = require_backend(backend)
    if backend == "torch" and device.type == "cuda":
        pytest.skip("the torch backend is F.batch_norm itself: on CUDA, cuDNN's statistics "
                    "(relative error 1e-5 to 1e-3 here), not ours to hold to this bound")
    x = (torch.randn(4, 3, 9, 9, dtype=torch.float64) + offset).float()
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    out = pk.batch_norm(x.to(device), rm, rv, training=True, momentum=1.0, backend=backend)
    x64 = x.double()
    var64 = x64.var((0, 2, 3))
    # 1e-6: a few float32 roundings of the centred sums (torch itself is at 1e-4 at 3e5)
    assert ((rv.cpu().double() - var64).abs() / var64).max() < 1e-6
    torch_rm, torch_rv = torch.zeros(3), torch.ones(3)
    torch_out = F.batch_norm(x, torch_rm, torch_rv, training=True, momentum=1.0)
    assert_close(rm, x64.mean((0, 2, 3)), torch_rm, torch.float32, "mean")
    # the output inherits the rounding of the float32 mean, as torch's does
    assert_close(out, F.batch_norm(x64, None, None, training=True), torch_out, torch.float32, "out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_estimators_never_mix(backend, training):
    """Channels of other estimators: outputs and gradients bit-identical when one group changes."""
    device = require_backend(backend)
    estimators, per_group = 4, 3
    x = torch.randn(3, estimators * per_group, 5, 4, device=device)
    w, b = torch.rand(x.shape[1], device=device) + 0.5, torch.randn(x.shape[1], device=device)
    rm, rv = torch.randn(x.shape[1], device=device), torch.rand(x.shape[1], device=device) + 0.5
    grad = torch.randn_like(x)
    changed = slice(per_group, 2 * per_group)  # estimator 1
    x2 = x.clone()
    x2[:, changed] = x2[:, changed] * 7.0 - 3.0

    def run(inp):
        inp = inp.clone().requires_grad_(True)
        wb = (w.clone().requires_grad_(True), b.clone().requires_grad_(True))
        r_mean, r_var = rm.clone(), rv.clone()
        out = pk.batch_norm(inp, r_mean, r_var, *wb, training, activation="relu", backend=backend)
        grads = torch.autograd.grad(out, (inp, *wb), grad)
        return (out, *grads, r_mean, r_var)

    first, second = run(x), run(x2)
    others = [c for c in range(x.shape[1]) if not per_group <= c < 2 * per_group]
    for a, b_ in zip(first, second):
        assert torch.equal(a[:, others] if a.dim() > 1 else a[others],
                           b_[:, others] if b_.dim() > 1 else b_[others])
    assert not torch.equal(first[0][:, changed], second[0][:, changed]) or not training


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    device = require_backend(backend)
    base = torch.randn(4, 6, 8, 5, device=device)
    x = base[:, ::2, 1:7]  # neither contiguous nor channels_last
    out = pk.batch_norm(x, None, None, training=True, activation="relu", backend=backend)
    ref = torch.relu(F.batch_norm(x.double().cpu(), None, None, training=True))
    assert (out.cpu().double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("backend", [None, "torch", "triton"])
@pytest.mark.parametrize("make_bad, error, match", [
    (lambda d: dict(input=torch.randn(1, 3, device=d), training=True), ValueError, "more than 1 value"),
    (lambda d: dict(input=torch.randn(1, 3, 1, 1, device=d), training=True), ValueError, "more than 1 value"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), running_mean=torch.zeros(4, device=d),
                    running_var=torch.ones(4, device=d)), ValueError, r"running_mean must have shape \(3,\)"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), weight=torch.ones(2, device=d), training=True),
     ValueError, "weight must have shape"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), running_mean=torch.zeros(3, device=d)),
     ValueError, "both running_mean and running_var"),
    (lambda d: dict(input=torch.randn(4, 3, device=d)), ValueError, "eval mode"),
    (lambda d: dict(input=torch.randint(0, 3, (4, 3), device=d), training=True), TypeError, "floating-point"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), weight=torch.ones(3, dtype=torch.int64, device=d),
                    training=True), TypeError, "weight must be a floating-point"),
    (lambda d: dict(input=torch.randn(4, device=d), training=True), ValueError, "at least 2 dimensions"),
    (lambda d: dict(input=torch.randn(4, 0, device=d), training=True), ValueError, "empty"),  # no channels
    (lambda d: dict(input=torch.randn(4, 3, device=d), residual=torch.randn(4, 3, dtype=torch.float16, device=d),
                    training=True), TypeError, "mixed dtypes"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), residual=torch.randn(4, 2, device=d), training=True),
     ValueError, "residual must have the input's shape"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), training=True, activation="gelu"), ValueError,
     "activation must be"),
    # refused by torch, so by every backend (the kernels would answer NaN/inf)
    (lambda d: dict(input=torch.randn(4, 3, device=d), training=True, eps=0.0), ValueError, "eps must be positive"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), training=True, eps=float("nan")), TypeError, "eps must be"),
    (lambda d: dict(input=torch.randn(4, 3, device=d), running_mean=torch.zeros(3, device=d),
                    running_var=torch.ones(3, device=d), training=True, momentum=None), TypeError,
     "momentum must be a float"),
])
def test_bad_input_raises_before_launch(backend, make_bad, error, match, device):
    kwargs = dict(running_mean=None, running_var=None)
    kwargs.update(make_bad(device))
    with pytest.raises(error, match=match):
        pk.batch_norm(kwargs.pop("input"), kwargs.pop("running_mean"), kwargs.pop("running_var"),
                      backend=backend, **kwargs)


def test_triton_rejects_float64_with_reason():
    with pytest.raises(pk.BackendUnavailableError, match="float32/float16/bfloat16"):
        pk.batch_norm(torch.randn(4, 3, dtype=torch.float64), None, None, training=True, backend="triton")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(backend, training):
    device = require_backend(backend)
    x = torch.randn(3, 4, 3, 2, device=device).requires_grad_(True)
    w, b = torch.rand(4, device=device).requires_grad_(True), torch.randn(4, device=device).requires_grad_(True)
    r = torch.randn_like(x).requires_grad_(True)
    stats = (None, None) if training else (torch.randn(4, device=device), torch.rand(4, device=device) + 0.5)
    torch.library.opcheck(bn_ops._batch_norm_op.op, (x, *stats, w, b, r, training, 1e-5, "relu", backend))
    out = pk.batch_norm(x, *stats, w, b, training, residual=r, activation="relu", backend=backend)
    mean = out.new_zeros(4) if not training else x.detach().mean((0, 2, 3))
    invstd = torch.rand(4, device=device) + 0.5
    torch.library.opcheck(bn_ops._batch_norm_backward_op.op,
                          (torch.randn_like(x), x.detach(), out.detach(), mean, invstd, w.detach(),
                           True, training, "relu", backend))


def test_compiles_fullgraph():
    bn = torch.nn.BatchNorm2d(4)

    def f(x, r):
        return pk.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                             residual=r, activation="relu", backend="torch")

    x, r = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, r)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    ref = torch.relu(F.batch_norm(x.detach(), None, None, bn.weight.detach(), bn.bias.detach(), True) + r)
    assert (out - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# packed_kernels.nn.BatchNorm2d against torch.nn.BatchNorm2d, step by step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("momentum, affine, track", [(0.1, True, True), (None, True, True),
                                                     (0.3, False, True), (0.1, True, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_matches_torch_over_training_steps(backend, momentum, affine, track, channels_last):
    device = require_backend(backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = pk.nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track,
                             backend=backend).to(device)
    theirs = torch.nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    if affine:
        with torch.no_grad():
            for p in (theirs.weight, theirs.bias):
                p.copy_(torch.randn(5))
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for step in range(3):
        x = (torch.randn(3, 5, 4, 3) * (step + 1) + step).to(device).to(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_ours, out_theirs = ours(xa), theirs(xb)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(x)
        out_ours.backward(grad)
        out_theirs.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 5, 3, 3, device=device).to(memory_format=fmt)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    if track:
        assert int(ours.num_batches_tracked) == 3


def test_module_is_a_drop_in():
    torch_bn = torch.nn.BatchNorm2d(4, eps=1e-3, momentum=None)
    torch_bn.train()(torch.randn(3, 4, 2, 2))
    ours = pk.nn.BatchNorm2d.from_batch_norm(torch_bn, activation="relu")
    assert isinstance(ours, torch.nn.BatchNorm2d) and ours.running_mean is torch_bn.running_mean
    assert ours.eps == 1e-3 and ours.momentum is None and "relu" in repr(ours)
    fresh = pk.nn.BatchNorm2d(4)
    fresh.load_state_dict(torch_bn.state_dict())
    assert int(fresh.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="expected 4D input"):
        fresh(torch.randn(3, 4))
    x, r = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expected = torch.relu(torch_bn.eval()(x) + r)
    torch.testing.assert_close(ours.eval()(x, r), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_3d_input(backend):
    device = require_backend(backend)
    x = torch.randn(2, 3, 2, 3, 4, device=device).to(memory_format=torch.channels_last_3d)
    r = torch.randn_like(x)
    out = pk.batch_norm(x, None, None, training=True, residual=r, activation="relu", backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    ref = torch.relu(F.batch_norm(x.double().cpu(), None, None, training=True) + r.double().cpu())
    assert (out.cpu().double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_statistics_get_gradients(backend):
    """Eval mode with statistics that require grad (ConvBNAct2d computes them from a conv's
    channel sums): gradients for mean and var as the float64 formula's autograd gives."""
    device = require_backend(backend)
    x = torch.randn(3, 4, 3, 3, device=device, requires_grad=True)
    mean = torch.randn(4, device=device, requires_grad=True)
    var = (torch.rand(4, device=device) + 0.5).requires_grad_(True)
    w = torch.randn(4, device=device, requires_grad=True)
    out = pk.batch_norm(x, mean, var, w, None, False, activation="relu", backend=backend)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, mean, var, w), grad)
    x64, m64, v64, w64 = leaves([x, mean, var, w], torch.float64)
    shape = (1, -1, 1, 1)
    ref = torch.relu((x64 - m64.view(shape)) * torch.rsqrt(v64.view(shape) + 1e-5) * w64.view(shape))
    refs = torch.autograd.grad(ref, (x64, m64, v64, w64), grad.double().cpu())
    for name, a, b in zip(("x", "mean", "var", "weight"), ours, refs):
        assert (a.cpu().double() - b).norm() <= 1e-5 * b.norm(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, channels_last", [
    ((3, 2, 41, 40), False),  # NCHW: two spatial blocks per row, tiles merged across splits
    ((9, 3, 33, 35), True),  # channels_last: many row tiles over several splits
    ((2, 130, 3, 3), True),  # several channel blocks, the last one partial
    ((5, 3, 1100), False),  # (N, C, L) with L over one spatial block
])
def test_multi_tile_shapes(backend, shape, channels_last):
    """Shapes whose statistics span several tiles, splits and channel blocks."""
    device = require_backend(backend)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).float().to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    w = torch.rand(c, device=device).add_(0.5).requires_grad_(True)
    r = torch.randn(shape, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    out = pk.batch_norm(x, rm, rv, w, None, True, residual=r, activation="relu", backend=backend)
    grad = torch.randn(shape, dtype=torch.float64)
    ours = torch.autograd.grad(out, (x, w, r), grad.float().to(device))
    x64, w64, r64 = leaves([x, w, r], torch.float64)
    rm64, rv64 = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    ref = torch.relu(F.batch_norm(x64, rm64, rv64, w64, None, True) + r64)
    refs = torch.autograd.grad(ref, (x64, w64, r64), grad)
    xl, wl, rl = leaves([x, w, r], torch.float32)
    rml, rvl = torch.zeros(c), torch.ones(c)
    low = torch.relu(F.batch_norm(xl, rml, rvl, wl, None, True) + rl)
    lows = torch.autograd.grad(low, (xl, wl, rl), grad.float())
    assert_close(out, ref, low, torch.float32, "out")
    assert_close(rm, rm64, rml, torch.float32, "running_mean")
    assert_close(rv, rv64, rvl, torch.float32, "running_var")
    for name, a, b, lw in zip("xwr", ours, refs, lows):
        assert_close(a, b, lw, torch.float32, f"grad {name}")
