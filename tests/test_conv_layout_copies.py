# SPDX-License-Identifier: Apache-2.0
"""Layout copies on the kernel engines for NCHW callers: the kernels read channels_last, so each
NCHW tensor is copied once per pass that reads it and never twice for the same pass."""

import pytest
import torch

import packed_kernels as pk
from packed_kernels import _backend


class CountingCopies:
    """Counts `Tensor.contiguous` calls that copy a tensor of `shape` (the engines convert layouts
    with it; the custom ops hide their insides from dispatch modes, so it is watched directly)."""

    def __init__(self, monkeypatch, shape):
        self.shape, self.count = tuple(shape), 0
        original = torch.Tensor.contiguous

        def contiguous(t, *args, **kwargs):
            out = original(t, *args, **kwargs)
            if tuple(t.shape) == self.shape and out.data_ptr() != t.data_ptr():
                self.count += 1
            return out
        monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)


@pytest.mark.parametrize("backend", ["simt", "triton"])
def test_nchw_grad_is_copied_to_channels_last_once_for_both_gradients(backend, monkeypatch):
    if _backend.unavailable_reason(backend, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)  # NCHW
    w = torch.randn(12, 2, 3, 3, requires_grad=True)
    y = pk.grouped_conv2d(x, w, None, 2, 1, 1, 4, backend=backend)
    grad = torch.randn_like(y)
    assert grad.is_contiguous() and not grad.is_contiguous(memory_format=torch.channels_last)
    copies = CountingCopies(monkeypatch, grad.shape)
    y.backward(grad)
    monkeypatch.undo()
    assert copies.count == 1
    ref_x, ref_w = torch.autograd.grad(torch.nn.functional.conv2d(x, w, None, 2, 1, 1, 4), (x, w), grad)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-4, atol=1e-4)
    assert x.grad.is_contiguous()


@pytest.mark.parametrize("backend", ["simt", "triton"])
@pytest.mark.parametrize("fused", [False, True])
def test_nchw_input_is_copied_to_channels_last_once_per_training_step(backend, fused, monkeypatch):
    """The forward's copy is the one the op saves: the weight gradient (and the fused op's
    recomputed pre-epilogue output) read it instead of converting the input again."""
    if _backend.unavailable_reason(backend, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)  # NCHW
    w = torch.randn(12, 2, 3, 3, requires_grad=True)
    scale = torch.rand(12) + 0.5
    copies = CountingCopies(monkeypatch, x.shape)
    if fused:
        y = pk.fused_conv2d(x, w, None, 1, 1, 1, 4, out_scale=scale, activation="relu",
                            backend=backend)
    else:
        y = pk.grouped_conv2d(x, w, None, 1, 1, 1, 4, backend=backend)
    assert y.is_contiguous()  # the caller's format
    grad = torch.randn_like(y)
    y.backward(grad)
    monkeypatch.undo()
    assert copies.count == 1
    reference = torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 4)
    if fused:
        reference = torch.relu(reference * scale.reshape(1, -1, 1, 1))
    ref_x, ref_w = torch.autograd.grad(reference, (x, w), grad)
    torch.testing.assert_close(y, reference.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["simt", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw_weight", "channels_last_weight"])
@pytest.mark.parametrize("shape", [(2, 8, 6, 6), (1, 8, 4, 4)], ids=["slabs", "one_slab"])
def test_autograd_keeps_the_weight_gradient_without_a_copy(backend, dtype, weight_format, shape):
    """The weight gradient comes in the weight's own memory format (a channels_last model's
    weights are channels_last), so autograd makes it the parameter's .grad as it is: the tensor
    the hook sees is the one stored. Summed from several fp32 slabs or written as one."""
    if _backend.unavailable_reason(backend, torch.device("cpu"), dtype) is not None:
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(12, 2, 3, 3, dtype=dtype).to(memory_format=weight_format).requires_grad_()
    incoming = []  # no reference to the gradient is kept: autograd may steal it
    w.register_hook(lambda g: incoming.append((g.data_ptr(), g.stride())))
    y = pk.grouped_conv2d(x, w, None, 1, 1, 1, 4, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert w.grad.stride() == w.stride()
    assert incoming == [(w.grad.data_ptr(), w.stride())]  # stored as it came: no copy
    x64, w64 = x.detach().double(), w.detach().double().requires_grad_()
    reference, = torch.autograd.grad(torch.nn.functional.conv2d(x64, w64, None, 1, 1, 1, 4), w64,
                                     grad.double())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: the gradient rounded to 2**-11
    torch.testing.assert_close(w.grad.double(), reference, rtol=tolerance, atol=tolerance)
