"""The CUDA C++ batch norm (csrc/kernels/batch_norm.cuh) through backend="simt" (the same source
on the SIMT emulator) and, on a GPU, backend="cuda": against torch in float64 (tests/helpers.py),
every dtype, NCHW and channels_last, training and eval, forward and backward. Shapes stay at a
few hundred elements: the emulator runs every thread."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels import _backend
from packed_kernels.ops import batch_norm as bn_ops

from conftest import require_backend
from helpers import assert_all_finite, assert_close

BACKENDS = ["simt", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# name -> (shape, memory format): odd sizes; > 256 values per channel (several per thread) in nchw
LAYOUTS = {
    "nchw": ((3, 5, 11, 9), torch.contiguous_format),
    "channels_last": ((2, 6, 3, 5), torch.channels_last),
    "2d": ((9, 7), torch.contiguous_format),
    "channels_last_3d": ((2, 3, 2, 3, 2), torch.channels_last_3d),
    "batch1_1x1": ((1, 4, 1, 1), torch.channels_last),  # eval only: one value per channel
}


def _randn(shape, dtype, device, mean=0.0, std=1.0):
    return (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype).to(device)


def _reference(x, rm, rv, w, b, r, training, relu):
    out = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    out = out + r if r is not None else out
    return torch.relu(out) if relu else out


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().cpu().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine, residual, relu", [(True, True, True), (False, False, False)])
def test_forward_backward_against_float64(backend, dtype, layout, training, affine, residual, relu):
    shape, memory_format = LAYOUTS[layout]
    if training and shape[0] * torch.Size(shape[2:]).numel() == 1:
        pytest.skip("one value per channel: training raises (tested below)")
    device = require_backend(backend, dtype)
    x = _randn(shape, dtype, device, 0.5, 2.0).contiguous(memory_format=memory_format).requires_grad_(True)
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype).to(device).requires_grad_(True) if affine else None
    b = _randn(c, dtype, device).requires_grad_(True) if affine else None
    r = _randn(shape, dtype, device).requires_grad_(True) if residual else None  # NCHW: the other layout too
    rm = (torch.randn(c, dtype=torch.float64) * 0.5).float().to(device)
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).float().to(device)
    rm_ours, rv_ours = rm.clone(), rv.clone()

    out = pk.batch_norm(x, rm_ours, rv_ours, w, b, training, 0.1, 1e-5, residual=r,
                        activation="relu" if relu else None, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=memory_format), "the output keeps the input's layout"
    assert_all_finite(out)  # outputs are NaN-poisoned before launch

    inputs = [x, w, b, r]
    ref_in, low_in = _leaves(inputs, torch.float64), _leaves(inputs, dtype)
    # copies: the references update their running statistics in place
    rm64, rv64 = rm.cpu().double(), rv.cpu().double()
    rm_low, rv_low = rm.cpu().to(dtype, copy=True), rv.cpu().to(dtype, copy=True)
    ref = _reference(ref_in[0], rm64, rv64, *ref_in[1:], training, relu)
    low = _reference(low_in[0], rm_low, rv_low, *low_in[1:], training, relu)
    assert_close(out, ref, low, dtype, "out")
    if training:  # float32 statistics: judged at float32 against the float64 update
        assert_close(rm_ours, rm64, rm_low.float(), torch.float32, "running_mean")
        assert_close(rv_ours, rv64, rv_low.float(), torch.float32, "running_var")
    else:
        assert torch.equal(rm_ours, rm) and torch.equal(rv_ours, rv)

    grad = torch.randn(shape, dtype=torch.float64)
    wants = [t for t in inputs if t is not None]
    ours = torch.autograd.grad(out, wants, grad.to(dtype).to(device).contiguous(memory_format=memory_format))
    refs = torch.autograd.grad(ref, [t for t in ref_in if t is not None], grad)
    lows = torch.autograd.grad(low, [t for t in low_in if t is not None], grad.to(dtype))
    for name, g_ours, g_ref, g_low in zip("xwbr", ours, refs, lows):
        assert g_ours.dtype == dtype and g_ours.shape == g_ref.shape
        assert_all_finite(g_ours)
        assert_close(g_ours, g_ref, g_low, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_before_launch(backend):
    device = require_backend(backend)
    with pytest.raises(ValueError, match="more than 1 value"):
        pk.batch_norm(torch.randn(1, 3, 1, 1, device=device), None, None, training=True, backend=backend)
    with pytest.raises(ValueError, match="weight must have shape"):
        pk.batch_norm(torch.randn(4, 3, device=device), None, None, torch.ones(2, device=device), training=True,
                      backend=backend)


def test_kernels_reject_bad_buffers():
    """The extension's own checks (the last line before a launch)."""
    require_backend("simt")
    ext = _backend.extension("_simt")
    x = torch.randn(4, 3, 2, 2)
    stats = [torch.empty(3) for _ in range(3)]
    with pytest.raises(RuntimeError, match="out must be in the input's memory format"):
        ext.batch_norm_forward(x, None, None, None, None, None, True, 1e-5, False,
                               torch.empty_like(x, memory_format=torch.channels_last), *stats)
    with pytest.raises(RuntimeError, match="float32"):
        ext.batch_norm_forward(x, None, None, None, torch.ones(3, dtype=torch.float16), None, True, 1e-5, False,
                               torch.empty_like(x), *stats)
    with pytest.raises(RuntimeError, match="more than 1 value"):
        x1 = torch.randn(1, 3)
        ext.batch_norm_forward(x1, None, None, None, None, None, True, 1e-5, False, torch.empty_like(x1), *stats)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        x64 = x.double()
        ext.batch_norm_forward(x64, None, None, None, None, None, True, 1e-5, False, torch.empty_like(x64), *stats)


def test_simt_and_cuda_listed_as_implemented():
    assert {"cuda", "simt"} <= set(bn_ops.IMPLEMENTED)
