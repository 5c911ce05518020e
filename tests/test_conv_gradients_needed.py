# SPDX-License-Identifier: Apache-2.0
"""grouped_conv2d computes only the gradients autograd asks for (an image at the stem needs none,
a frozen weight needs none), on every backend, with torch's values for the others."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels import _backend


@pytest.mark.parametrize("backend", ["torch", "simt", "triton"])
@pytest.mark.parametrize("needs", [(False, True), (True, False)], ids=["weight_only", "input_only"])
def test_grouped_conv2d_backward_computes_only_the_needed_gradients(backend, needs, monkeypatch):
    if _backend.unavailable_reason(backend, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(f"{backend} is not available here")
    from packed_kernels.ops import conv_engines
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 7).to(memory_format=torch.channels_last).requires_grad_(needs[0])
    w = torch.randn(12, 2, 3, 3, requires_grad=needs[1])
    b = torch.randn(12, requires_grad=True)
    ran = []
    original = conv_engines.conv_grads

    def conv_grads(engines, *args, **kwargs):
        ran.append(engines)
        return original(engines, *args, **kwargs)
    monkeypatch.setattr("packed_kernels.ops.conv.conv_grads", conv_grads)
    out = pk.grouped_conv2d(x, w, b, 2, 1, 1, 4, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    if backend != "torch":  # the torch engine asks cuDNN for the mask in one call
        assert ran == [(backend if needs[0] else None, backend if needs[1] else None)]
    wanted = [t for t, need in zip((x, w), needs) if need]
    expected = torch.autograd.grad(F.conv2d(x, w, b, 2, 1, 1, 4), wanted + [b], grad)
    got = [t.grad for t in wanted] + [b.grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    assert (x.grad is None) != needs[0] and (w.grad is None) != needs[1]
