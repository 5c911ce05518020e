# SPDX-License-Identifier: Apache-2.0
"""Per-channel vectors that are views (every other element of a longer tensor) or expanded
(stride 0: a read past one element would leave the storage) give torch's answer on every
backend: the kernels read vectors with stride 1, so the launchers must hand them dense ones."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk

from conftest import require_backend

BACKENDS = ["torch", "triton", "simt", "cuda"]
C = 8


def _vector(kind, device, positive=False):
    """Made on `device` and then viewed: a copy to another device would make it dense."""
    base = torch.randn(2 * C if kind == "strided" else 1)
    base = (base.abs() + 0.5 if positive else base).to(device)
    return base[::2] if kind == "strided" else base.expand(C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "expanded"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_reads_non_contiguous_vectors(backend, kind, training):
    device = require_backend(backend)
    x = torch.randn(2, C, 4, 4)
    weight, bias = _vector(kind, device), _vector(kind, device)
    running_mean, running_var = _vector("strided", device), _vector("strided", device, positive=True)
    assert not weight.is_contiguous() and not bias.is_contiguous()
    ref = F.batch_norm(x, running_mean.cpu().clone(), running_var.cpu().clone(), weight.cpu(),
                       bias.cpu(), training=training)
    ours = pk.batch_norm(x.to(device), running_mean, running_var, weight, bias, training=training,
                         backend=backend)
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_fused_conv2d_reads_non_contiguous_vectors(backend, kind):
    device = require_backend(backend)
    x = torch.randn(2, C, 5, 5)
    w = torch.randn(C, C // 2, 3, 3) / 6
    vectors = {name: _vector(kind, device, positive=name.endswith("scale"))
               for name in ("in_scale", "in_shift", "out_scale", "out_shift")}
    bias = _vector(kind, device)
    ours = pk.fused_conv2d(x.to(device), w.to(device), bias, padding=1, groups=2, **vectors,
                           in_activation="relu", activation="relu", backend=backend)
    dense = {k: v.cpu().contiguous() for k, v in vectors.items()}
    ref = pk.fused_conv2d(x, w, bias.cpu().contiguous(), padding=1, groups=2, **dense,
                          in_activation="relu", activation="relu", backend="torch")
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-4, atol=1e-4)
