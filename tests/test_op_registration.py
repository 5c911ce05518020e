# SPDX-License-Identifier: Apache-2.0
"""Every custom op passes torch.library.opcheck on every backend this machine runs, and a small
model built on the ops compiles with torch.compile(fullgraph=True), forward and backward."""

import pytest
import torch

import packed_kernels as pk
from packed_kernels.ops import batch_norm as bn_ops
from packed_kernels.ops import conv as conv_ops
from packed_kernels.ops import ensemble as ensemble_ops

from conftest import require_backend


def _ensemble_samples(device, dtype):
    logits = torch.randn(8, 5, device=device, dtype=dtype, requires_grad=True)
    dense = torch.randn(8, 3, 2, device=device, dtype=dtype, requires_grad=True)
    return logits, dense


@pytest.mark.parametrize("backend", ensemble_ops.IMPLEMENTED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_ensemble_ops(backend, dtype):
    device = require_backend(backend, dtype)
    logits, dense = _ensemble_samples(device, dtype)
    torch.library.opcheck(ensemble_ops._ensemble_mean_op.op, (logits, 4, backend))
    torch.library.opcheck(ensemble_ops._ensemble_mean_op.op, (dense, 2, backend))
    torch.library.opcheck(ensemble_ops._ensemble_scores_op.op, (logits, 4, backend))
    grad = torch.randn(2, 5, device=device, dtype=dtype)
    torch.library.opcheck(ensemble_ops._ensemble_mean_backward_op.op, (grad, logits.detach(), 4, backend))
    grads = (grad, *(torch.randn(2, device=device, dtype=dtype) for _ in range(4)))
    torch.library.opcheck(ensemble_ops._ensemble_scores_backward_op.op, (*grads, logits.detach(), 4, backend))


@pytest.mark.parametrize("backend", conv_ops.IMPLEMENTED)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_grouped_conv2d(backend, channels_last):
    device = require_backend(backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 5, 5, device=device).to(memory_format=fmt).requires_grad_(True)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    torch.library.opcheck(conv_ops._grouped_conv2d_op.op, (x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 2, backend))
    torch.library.opcheck(conv_ops._grouped_conv2d_op.op, (x, w, None, [2, 1], [0, 1, 1, 2], [1, 1], 2, backend))


@pytest.mark.parametrize("backend", bn_ops.IMPLEMENTED)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_batch_norm(backend, training):
    device = require_backend(backend)
    x = torch.randn(3, 4, 2, 2, device=device, requires_grad=True)
    residual = torch.randn(3, 4, 2, 2, device=device, requires_grad=True)
    weight = torch.randn(4, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    stats = (None, None) if training else (torch.randn(4, device=device), torch.rand(4, device=device) + 0.5)
    torch.library.opcheck(bn_ops._batch_norm_op.op,
                          (x, *stats, weight, bias, residual, training, 1e-5, "relu", backend))
    torch.library.opcheck(bn_ops._batch_norm_op.op, (x, *stats, None, None, None, training, 1e-5, None, backend))


class _TinyPackedNet(torch.nn.Module):
    """conv -> batch norm + ReLU -> grouped conv + residual -> pooled logits -> ensemble mean."""

    def __init__(self, backend, estimators=2, classes=3):
        super().__init__()
        self.backend, self.estimators = backend, estimators
        self.stem = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.grouped = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 0.3)
        self.gamma = torch.nn.Parameter(torch.ones(8))
        self.beta = torch.nn.Parameter(torch.zeros(8))
        self.register_buffer("running_mean", torch.zeros(8))
        self.register_buffer("running_var", torch.ones(8))
        self.head = torch.nn.Parameter(torch.randn(estimators, 4, classes) * 0.3)

    def forward(self, x):
        y = pk.grouped_conv2d(x, self.stem, padding=1)
        y = pk.batch_norm(y, self.running_mean, self.running_var, self.gamma, self.beta,
                          training=self.training, activation="relu")
        y = torch.relu(pk.grouped_conv2d(y, self.grouped, padding=1, groups=2) + y)
        pooled = y.mean(dim=(2, 3)).view(x.shape[0], self.estimators, 4)  # estimator-major logits:
        logits = torch.einsum("bmc,mck->mbk", pooled, self.head).reshape(-1, self.head.shape[2])
        return pk.ensemble_mean(logits, self.estimators, backend=self.backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_forward_backward(backend):
    device = require_backend(backend)
    torch._dynamo.reset()
    model = _TinyPackedNet(backend).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g)


def test_op_implementations_run_on_their_inputs_device(monkeypatch):
    """Triton launches on the current device: every op implementation makes its first input's
    GPU current (and leaves the current one alone when it already is)."""
    from packed_kernels import _backend
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)

    class OnGpu:
        is_cuda = True

        def __init__(self, index):
            self.device = torch.device("cuda", index)
    seen = []
    op = _backend.on_input_device(lambda x, y: seen.append(y) or "done")
    assert op(OnGpu(1), 3) == "done" and entered == [torch.device("cuda", 1)] and seen == [3]
    op(OnGpu(0), 4)
    assert len(entered) == 1 and seen == [3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_a_gpu_that_is_not_current():
    x = torch.randn(2, 8, 6, 6, device="cuda:1")
    w = torch.randn(8, 4, 3, 3, device="cuda:1")
    with torch.cuda.device(0):
        for backend in ("triton", "cuda"):
            ours = pk.grouped_conv2d(x, w, padding=1, groups=2, backend=backend)
            torch.testing.assert_close(ours, torch.nn.functional.conv2d(x, w, padding=1, groups=2),
                                       rtol=1e-3, atol=1e-3)


def _fused_call(x, w, scale, shift):
    y, mean, var = pk.fused_conv2d(x, w, padding=1, groups=2, in_scale=scale, in_shift=shift,
                                   in_activation="relu", activation="relu", channel_stats=True)
    return y.sum() + mean.sum() + (var * var).sum()


def _fused_leaves():
    torch.manual_seed(0)
    return [torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True),
            torch.rand(4, dtype=torch.float64, requires_grad=True),
            torch.randn(4, dtype=torch.float64, requires_grad=True)]


def test_eager_calls_skip_the_dispatcher_with_the_same_values_and_gradients(monkeypatch):
    """Eager calls run the op's implementation (and its autograd formula) without torch's
    dispatcher; the values and gradients are exactly those of the registered op."""
    leaves = _fused_leaves()
    through_op = _fused_call(*leaves)
    expected = torch.autograd.grad(through_op, leaves)

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the dispatcher")
    for name in ("_fused_conv2d_op", "_fused_conv2d_backward_op", "_grouped_conv2d_op"):
        monkeypatch.setattr(getattr(conv_ops, name), "op", refuse)
    eager = _fused_call(*leaves)
    grads = torch.autograd.grad(eager, leaves)
    assert torch.equal(eager, through_op)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)
    with torch.no_grad():
        pk.grouped_conv2d(leaves[0], leaves[1], padding=1, groups=2)


def test_traced_calls_go_through_the_registered_op():
    """make_fx / export / torch.compile see the custom op, not its implementation."""
    from torch.fx.experimental.proxy_tensor import make_fx
    leaves = _fused_leaves()
    graph = make_fx(lambda *t: torch.autograd.grad(_fused_call(*t), t))(*leaves)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "packed_kernels.fused_conv2d.default" in targets
    assert "packed_kernels.fused_conv2d_backward.default" in targets
    assert not any("convolution" in t for t in targets)  # the implementation stays inside the op


def test_double_backward_through_an_eager_op_raises():
    leaves = _fused_leaves()
    grads = torch.autograd.grad(_fused_call(*leaves), leaves, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grads[0].sum(), leaves)
