# SPDX-License-Identifier: Apache-2.0
"""Deployment without packed_kernels: every custom op's decomposition computes what the op
computes on the torch backend, and an exported PE ResNet-18 runs after a save/load in a process
that never imports packed_kernels, and in onnxruntime."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import packed_kernels as pk
from packed_kernels import export as pk_export
from packed_kernels.models import packed_resnet
from packed_kernels.nn import BatchNorm2d, set_backend
from packed_kernels.ops import decompositions

from conftest import require_backend

_ops = torch.ops.packed_kernels


def _library_ops(program: torch.export.ExportedProgram) -> set:
    return {str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("packed_kernels.")}


def _assert_same(ours, theirs) -> None:
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, equal_nan=True)


def test_every_custom_op_has_a_decomposition():
    registered = {getattr(_ops, name).default for name in dir(_ops)
                  if isinstance(getattr(_ops, name, None), torch._ops.OpOverloadPacket)}
    assert registered and registered == set(decompositions.DECOMPOSITIONS)


# ---------------------------------------------------------------------------------------------
# each decomposition against its op on the torch backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding", [[1, 1, 1, 1], [0, 1, 0, 1]])  # [0, 1, ...]: "same", even kernel
def test_conv_decompositions(channels_last, padding):
    x = torch.randn(2, 4, 7, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kernel = 3 if padding[0] == 1 else 2
    w, b = torch.randn(6, 2, kernel, kernel), torch.randn(6)
    geometry = ([1, 1], padding, [1, 1], 2)
    _assert_same(decompositions.grouped_conv2d(x, w, b, *geometry, "simt"),
                 _ops.grouped_conv2d(x, w, b, *geometry, "torch"))
    out = _ops.grouped_conv2d(x, w, b, *geometry, "torch")
    grad = torch.randn_like(out)
    for need in ((True, True), (True, False), (False, True)):
        _assert_same(decompositions.grouped_conv2d_backward(grad, x, w, True, *geometry, "simt", *need),
                     _ops.grouped_conv2d_backward(grad, x, w, True, *geometry, "torch", *need))

    in_scale, in_shift, out_scale, out_shift = (torch.randn(c) for c in (4, 4, 6, 6))
    residual = torch.randn_like(out)
    for stats in (False, True):
        args = (x, w, b, in_scale, in_shift, out_scale, out_shift, residual, *geometry, "relu",
                "relu", stats)
        out, mean, var = _ops.fused_conv2d(*args, "torch")
        _assert_same(decompositions.fused_conv2d(*args, "simt"), (out, mean, var))
        grad_stats = torch.randn(2, 6) if stats else torch.zeros(0, 6)
        for need_input, need_weight in ((True, True), (False, True), (True, False)):
            backward = (torch.randn_like(out), grad_stats, out, *args[:-1], stats)
            _assert_same(decompositions.fused_conv2d_backward(*backward, "simt", need_input,
                                                              need_weight),
                         _ops.fused_conv2d_backward(*backward, "torch", need_input, need_weight))


@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_decompositions(training):
    x = torch.randn(4, 3, 5, 5)
    rm, rv, w, b = torch.randn(3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3)
    residual = torch.randn_like(x)
    stats = (None, None) if training else (rm, rv)
    args = (x, *stats, w, b, residual, training, 1e-5, "relu")
    expected = _ops.batch_norm(*args, "torch")
    _assert_same(decompositions.batch_norm(*args, "simt"), expected)
    out, mean, _, invstd = expected
    if not training:
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
    grad = torch.randn_like(x)
    backward = (grad, x, out, mean, invstd, w, True, training, "relu")
    _assert_same(decompositions.batch_norm_backward(*backward, "simt"),
                 _ops.batch_norm_backward(*backward, "torch"))


def test_ensemble_decompositions():
    logits = torch.randn(12, 5)
    logits[0, 1] = float("-inf")  # a masked class
    _assert_same(decompositions.ensemble_scores(logits, 3, "simt"),
                 _ops.ensemble_scores(logits, 3, "torch"))
    grads = (torch.randn(4, 5), *(torch.randn(4) for _ in range(4)))
    _assert_same(decompositions.ensemble_scores_backward(*grads, logits, 3, "simt"),
                 _ops.ensemble_scores_backward(*grads, logits, 3, "torch"))
    spatial = torch.randn(6, 4, 3, 2)  # (M*B, C, *)
    _assert_same(decompositions.ensemble_mean(spatial, 2, "simt"),
                 _ops.ensemble_mean(spatial, 2, "torch"))
    grad = torch.randn(3, 4, 3, 2)
    _assert_same(decompositions.ensemble_mean_backward(grad, spatial, 2, "simt"),
                 _ops.ensemble_mean_backward(grad, spatial, 2, "torch"))


class _EveryForwardOp(torch.nn.Module):
    """Calls each public op on one kernel backend: each is a packed_kernels node when traced."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend
        self.weight = torch.nn.Parameter(torch.randn(8, 2, 3, 3))
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)

    def forward(self, x):
        y = pk.grouped_conv2d(x, self.weight, padding=1, groups=2, backend=self.backend)
        y = pk.batch_norm(y, self.mean, self.var, activation="relu", backend=self.backend)
        logits = y.mean((2, 3))  # (M*B, C) with M = 2
        return (pk.ensemble_mean(logits, 2, backend=self.backend),
                *pk.ensemble_scores(logits, 2, backend=self.backend))


def test_export_decomposes_every_forward_op():
    require_backend("simt")
    model = _EveryForwardOp("simt")
    x = torch.randn(4, 4, 6, 6)
    assert {"packed_kernels.grouped_conv2d.default", "packed_kernels.batch_norm.default",
            "packed_kernels.ensemble_mean.default", "packed_kernels.ensemble_scores.default"} \
        <= _library_ops(torch.export.export(model, (x,)))
    program = pk_export.export(model, (x,))
    assert not _library_ops(program)
    model.backend = "torch"
    with torch.no_grad():
        _assert_same(program.module()(x), model(x))


@pytest.mark.gpu
def test_export_decomposes_on_cuda():
    """Ops traced with a GPU backend on CUDA tensors decompose to aten ops that run on CUDA."""
    device = require_backend("triton")
    model = _EveryForwardOp("triton").to(device)
    x = torch.randn(4, 4, 6, 6, device=device)
    program = pk_export.export(model, (x,))
    assert not _library_ops(program)
    model.backend = "torch"
    with torch.no_grad():
        _assert_same(program.module()(x), model(x))


# ---------------------------------------------------------------------------------------------
# PE ResNet-18: export, load in a process without packed_kernels, ONNX
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18():
    """An eval-mode PE ResNet-18 (alpha 2, M 4) on the fused conv + BN path, its program
    exported with a dynamic batch, and an input of another batch size."""
    require_backend("simt")
    torch.manual_seed(0)
    model = packed_resnet(in_channels=3, num_classes=10, arch=18, num_estimators=4, alpha=2,
                          gamma=1, style="cifar", normalization_layer=BatchNorm2d).eval()
    for module in model.modules():  # non-trivial statistics, so BN folding is visible
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    set_backend(model, "simt")  # every conv a packed_kernels::fused_conv2d node when traced
    example = torch.randn(2, 3, 32, 32)
    assert "packed_kernels.fused_conv2d.default" in _library_ops(torch.export.export(model, (example,)))
    program = pk_export.export(model, (example,),
                               dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    set_backend(model, None)  # eager reference: the same function on torch's ops, on the CPU
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    return program, x, expected


def test_exported_resnet_matches_eager(resnet18):
    program, x, expected = resnet18
    assert not _library_ops(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected)


def test_exported_resnet_runs_without_packed_kernels(resnet18, tmp_path):
    program, x, expected = resnet18
    torch.export.save(program, tmp_path / "model.pt2")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent("""
        import sys
        import torch
        program = torch.export.load(sys.argv[1])
        io = torch.load(sys.argv[2])
        with torch.no_grad():
            out = program.module()(io["x"])
        torch.testing.assert_close(out, io["expected"])
        assert not [m for m in sys.modules if m.startswith("packed_kernels")], "imported"
        print("ok", tuple(out.shape))
    """)
    # -I: isolated mode (no current directory or user site on sys.path), from a neutral folder
    result = subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path / "model.pt2"),
                             str(tmp_path / "io.pt")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (12, 10)" in result.stdout  # (M*B, classes)


def test_exported_resnet_to_onnx(resnet18, tmp_path):
    pytest.importorskip("onnxscript")
    program, x, expected = resnet18
    path = tmp_path / "model.onnx"
    pk_export.to_onnx(program, f=str(path))
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(path))
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # onnxruntime's own conv and reduction order: float32 rounding, not the 1.3e-6 default
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)


def test_export_names_an_undecomposed_op(monkeypatch):
    require_backend("simt")
    model = _EveryForwardOp("simt")
    table = pk_export.decomposition_table()
    del table[_ops.ensemble_mean.default]
    monkeypatch.setattr(pk_export, "decomposition_table", lambda: table)
    with pytest.raises(RuntimeError, match="packed_kernels.ensemble_mean"):
        pk_export.export(model, (torch.randn(4, 4, 6, 6),))


def test_torchscript_is_refused_with_a_pointer_to_export():
    model = torch.nn.Sequential(
        packed_resnet(in_channels=3, num_classes=10, arch=18, num_estimators=2, alpha=1, gamma=1))
    with pytest.raises(TypeError, match=r"PackedResNet.*TorchScript.*packed_kernels\.export"):
        torch.jit.script(model)
