# SPDX-License-Identifier: Apache-2.0
"""NaN goes where torch sends it: through fused ReLUs (torch.relu keeps NaN), into the statistics
and outputs it touches, and, backwards, torch's relu gradient passes where the output is NaN.
A model that produces NaN under torch must produce it on every backend too."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk

from conftest import require_backend

BACKENDS = ["torch", "triton", "simt", "cuda"]


def _same_nans_and_values(ours, ref, what):
    ours, ref = ours.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{what}: NaN positions differ"
    assert torch.isnan(ref).any(), f"{what}: the case must produce NaN"
    # fp32 against fp32: the kernels sum in another order (and Triton's interpreter in numpy)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, equal_nan=True, msg=what)


def _nan_input(device, shape=(2, 8, 6, 6)):
    x = torch.randn(shape)
    x[1, 3, 2, 4] = float("nan")
    return x.contiguous(memory_format=torch.channels_last).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_passes_the_conv_epilogue_and_prologue_relus(backend):
    device = require_backend(backend)
    x = _nan_input(device)
    w = torch.randn(8, 4, 3, 3).to(device) / 6
    scale, shift = torch.rand(8).add(0.5).to(device), torch.randn(8).to(device)
    # epilogue: out = relu(conv(x)); prologue: relu(x * scale + shift) before the conv
    out = pk.fused_conv2d(x, w, None, padding=1, groups=2, activation="relu", backend=backend)
    ref = torch.relu(F.conv2d(x.cpu(), w.cpu(), None, padding=1, groups=2))
    _same_nans_and_values(out, ref, "epilogue relu")
    out = pk.fused_conv2d(x, w, None, padding=1, groups=2, in_scale=scale, in_shift=shift,
                          in_activation="relu", backend=backend)
    x_hat = torch.relu(x.cpu() * scale.cpu().view(1, -1, 1, 1) + shift.cpu().view(1, -1, 1, 1))
    _same_nans_and_values(out, F.conv2d(x_hat, w.cpu(), None, padding=1, groups=2), "prologue relu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_nan_passes_batch_norm_relu_and_its_gradient(backend, training):
    device = require_backend(backend)
    x = _nan_input(device)
    weight, bias = torch.rand(8).add(0.5), torch.randn(8)
    rm, rv = torch.randn(8), torch.rand(8).add(0.5)

    def run(x, weight, bias, rm, rv, fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2])
        out.backward(torch.ones_like(out))
        return out, [leaf.grad for leaf in leaves]

    ours, ours_grads = run(x, weight.to(device), bias.to(device), rm.to(device), rv.to(device),
                           lambda *a: pk.batch_norm(*a, training=training, activation="relu", backend=backend))
    ref, ref_grads = run(x.cpu(), weight, bias, rm, rv,
                         lambda x, m, v, w, b: torch.relu(F.batch_norm(x, m, v, w, b, training=training)))
    _same_nans_and_values(ours, ref, "batch norm relu")
    for name, g, r in zip(("input", "weight", "bias"), ours_grads, ref_grads):
        # in eval mode only the NaN element's own gradient path is NaN-free: torch's relu
        # backward passes the upstream gradient there, so the input gradient stays finite
        assert torch.equal(torch.isnan(g.cpu()), torch.isnan(r)), f"grad {name}: NaN positions differ"
        torch.testing.assert_close(g.cpu(), r, rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_an_inf_makes_batch_norm_mean_inf_and_variance_nan(backend, memory_format, where):
    """As torch's batch norm: a channel holding +inf among finite values has mean +inf and
    variance NaN (its running mean inf, running variance NaN), wherever the inf sits in the
    reduction (a running mean + (x - mean) / n would turn it NaN at the next finite value)."""
    device = require_backend(backend)
    x = torch.randn(16, 3, 16, 16)
    position = {"first": (0, 0, 0), "middle": (7, 5, 9), "last": (15, 15, 15)}[where]
    x[position[0], 1, position[1], position[2]] = float("inf")
    x = x.contiguous(memory_format=memory_format)
    rm, rv = torch.zeros(3), torch.ones(3)
    ref = F.batch_norm(x, rm, rv, training=True)
    ours_rm, ours_rv = rm.new_zeros(3).to(device), rm.new_ones(3).to(device)
    ours = pk.batch_norm(x.to(device), ours_rm, ours_rv, None, None, training=True, backend=backend)
    assert rm[1] == float("inf") and torch.isnan(rv[1])  # torch's answer, which ours must give
    assert torch.equal(ours_rm.cpu().isinf(), rm.isinf()) and torch.equal(ours_rv.cpu().isnan(), rv.isnan())
    torch.testing.assert_close(ours_rm.cpu(), rm, rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(ours_rv.cpu(), rv, rtol=1e-4, atol=1e-4, equal_nan=True)
    _same_nans_and_values(ours, ref, "batch norm of a channel holding inf")
