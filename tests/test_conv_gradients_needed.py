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


@pytest.mark.parametrize("backend", ["simt", pytest.param("triton", marks=pytest.mark.slow)])
def test_training_step_launches_no_input_gradient_for_the_image(backend, monkeypatch):
    """A PE ResNet's training step asks no gradient of the image: the stem's convolution
    launches only its weight gradient, every other convolution both."""
    if _backend.unavailable_reason(backend, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(f"{backend} is not available here")
    from packed_kernels.models.resnet import PackedResNet, _BasicBlock
    from packed_kernels.ops import conv_engines
    torch.manual_seed(0)
    model = PackedResNet(_BasicBlock, [1, 1, 1], 3, 5, conv_bias=False, num_estimators=2,
                         dropout_rate=0.0, alpha=2, gamma=2, style="cifar", in_planes=4)
    pk.nn.set_backend(model, backend).train()
    launched = []
    original = conv_engines.conv_grads

    def conv_grads(engines, grad, input, *args, **kwargs):
        launched.append((input.shape[1], engines))
        return original(engines, grad, input, *args, **kwargs)
    monkeypatch.setattr("packed_kernels.ops.conv.conv_grads", conv_grads)
    out = model(torch.randn(2, 3, 8, 8))
    F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long)).backward()
    assert [engines for channels, engines in launched if channels == 3] == [(None, backend)]
    assert len(launched) > 1 and all(engines == (backend, backend)
                                     for channels, engines in launched if channels != 3)
