# SPDX-License-Identifier: Apache-2.0
"""Shared batch-norm test pieces: inputs, the torch reference, and the check of pk.batch_norm's
forward (+ running statistics) and backward against torch in float64 (tests/helpers.py)."""

import torch
import torch.nn.functional as F

import packed_kernels as pk

from helpers import assert_all_finite, assert_close


def randn(shape, dtype, device, mean=0.0, std=1.0):
    return (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype).to(device)


def reference(x, rm, rv, w, b, r, training, relu, eps=1e-5):
    out = F.batch_norm(x, rm, rv, w, b, training, 0.1, eps)
    out = out + r if r is not None else out
    return torch.relu(out) if relu else out


def leaves(tensors, dtype):
    """CPU copies in `dtype`, leaves with the originals' requires_grad."""
    return [None if t is None else t.detach().cpu().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


def check_against_float64(backend, x, memory_format, training, affine, residual, relu):
    """pk.batch_norm of `x` (its dtype, device and layout; the residual contiguous, so the other
    layout for channels_last) with float32 running statistics, as a module under autocast keeps
    them: output, running statistics and every gradient against float64."""
    dtype, device, shape = x.dtype, x.device, x.shape
    x = x.detach().requires_grad_(True)
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype).to(device).requires_grad_(True) if affine else None
    b = randn(c, dtype, device).requires_grad_(True) if affine else None
    r = randn(shape, dtype, device).requires_grad_(True) if residual else None
    rm = (torch.randn(c, dtype=torch.float64) * 0.5).float().to(device)
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).float().to(device)
    rm_ours, rv_ours = rm.clone(), rv.clone()

    out = pk.batch_norm(x, rm_ours, rv_ours, w, b, training, 0.1, 1e-5, residual=r,
                        activation="relu" if relu else None, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=memory_format), "the output keeps the input's layout"
    assert_all_finite(out)  # outputs are NaN-poisoned before launch

    inputs = [x, w, b, r]
    ref_in, low_in = leaves(inputs, torch.float64), leaves(inputs, dtype)
    # copies: the references update their running statistics in place
    rm64, rv64 = rm.cpu().double(), rv.cpu().double()
    rm_low, rv_low = rm.cpu().to(dtype, copy=True), rv.cpu().to(dtype, copy=True)
    ref = reference(ref_in[0], rm64, rv64, *ref_in[1:], training, relu)
    low = reference(low_in[0], rm_low, rv_low, *low_in[1:], training, relu)
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
