# SPDX-License-Identifier: Apache-2.0
"""ConvBNAct2d against the unfused torch modules (Conv2d -> BatchNorm2d -> [+ residual] -> ReLU)."""

import copy

import pytest
import torch
from torch import nn

import packed_kernels as pk
from packed_kernels.nn import ConvBNAct2d, DeferredBatchNorm

from conftest import require_backend
from helpers import assert_all_finite, assert_close

BACKENDS = ["torch", "triton", "simt"]  # simt: the CUDA C++ conv and batch norm on the emulator
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Unfused(nn.Module):
    def __init__(self, conv, bn, relu=True):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


def _pair(c_in, c_out, k, groups, stride=1, padding=1, momentum=0.1, conv_bias=False):
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=conv_bias)
    bn = nn.BatchNorm2d(c_out, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return Unfused(conv, bn)


def _fused_from(unfused, backend, relu=True):
    block = ConvBNAct2d(unfused.conv.in_channels, unfused.conv.out_channels, unfused.conv.kernel_size,
                        unfused.conv.stride, unfused.conv.padding, groups=unfused.conv.groups,
                        bias=unfused.conv.bias is not None, momentum=unfused.bn.momentum,
                        activation="relu" if relu else None, backend=backend)
    block.load_state_dict(unfused.state_dict())  # keys conv.* and bn.*
    return block


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum, residual, conv_bias", [(0.1, True, False), (None, False, True)])
def test_matches_unfused_over_training_steps_then_eval(backend, channels_last, momentum, residual, conv_bias):
    device = require_backend(backend)
    unfused = _pair(4, 6, 3, groups=2, momentum=momentum, conv_bias=conv_bias).to(device)
    fused = _fused_from(unfused, backend).to(device)
    fmt = _fmt(channels_last)
    for step in range(2):
        x = (torch.randn(2, 4, 5, 5, device=device) + step).to(memory_format=fmt)
        r = torch.randn(2, 6, 5, 5, device=device).to(memory_format=fmt) if residual else None
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ra = rb = None
        if residual:
            ra, rb = r.clone().requires_grad_(True), r.clone().requires_grad_(True)
        out_f, out_u = fused(xa, ra), unfused(xb, rb)
        assert out_f.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out_f, out_u, rtol=1e-4, atol=1e-4)
        grad = torch.randn_like(out_u)
        out_f.backward(grad)
        out_u.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        if residual:
            torch.testing.assert_close(ra.grad, rb.grad)
        for (name, a), b in zip(fused.named_parameters(), unfused.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
        for (name, a), b in zip(fused.named_buffers(), unfused.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    fused.eval()
    unfused.eval()
    x = torch.randn(2, 4, 5, 5, device=device).to(memory_format=fmt)
    r = torch.randn(2, 6, 5, 5, device=device).to(memory_format=fmt) if residual else None
    torch.testing.assert_close(fused(x, r), unfused(x, r), rtol=1e-4, atol=1e-4)


def _bottleneck(backend, groups, device, dtype=torch.float32):
    """A PE bottleneck's convolutions: 1x1, 3x3 (stride 2), 1x1 + shortcut."""
    pairs = [_pair(8, 4, 1, groups, padding=0), _pair(4, 4, 3, groups, stride=2),
             _pair(4, 8, 1, groups, padding=0)]
    unfused = [p.to(device) for p in pairs]
    fused = [_fused_from(p, backend).to(device) for p in pairs]
    return [u.to(dtype) for u in unfused], [f.to(dtype) for f in fused]


def _run_unfused(blocks, x, shortcut):
    return blocks[2](blocks[1](blocks[0](x)), shortcut)


def _run_fused(blocks, x, shortcut):
    h = blocks[0](x, defer=True)
    if blocks[0].training:  # on the torch engine the block runs torch's sequence: nothing deferred
        assert isinstance(h, DeferredBatchNorm) == (blocks[0].backend != "torch")
    h = blocks[1](h, defer=True)
    return blocks[2](h, shortcut)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bottleneck_with_deferred_batch_norm_against_float64(backend, dtype, channels_last):
    """BN + ReLU deferred into the next conv's prologue: output and every gradient against the
    float64 unfused chain, judged against the unfused torch chain at the same precision."""
    device = require_backend(backend, dtype)
    unfused, fused = _bottleneck(backend, groups=2, device=device)
    fmt = _fmt(channels_last)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64).to(memory_format=fmt)
    shortcut = torch.randn(2, 8, 3, 3, dtype=torch.float64).to(memory_format=fmt)
    grad = torch.randn(2, 8, 3, 3, dtype=torch.float64)

    def run(blocks, run_fn, run_dtype, run_device):
        blocks = [copy.deepcopy(b).to(run_device).to(run_dtype) for b in blocks]
        xi = x.to(run_dtype).to(run_device).requires_grad_(True)
        si = shortcut.to(run_dtype).to(run_device).requires_grad_(True)
        out = run_fn(blocks, xi, si)
        params = [p for b in blocks for p in b.parameters()]
        grads = torch.autograd.grad(out, [xi, si, *params], grad.to(run_dtype).to(run_device))
        stats = [t for b in blocks for t in (b.bn.running_mean, b.bn.running_var)]
        return out, grads, stats

    out, grads, stats = run(fused, _run_fused, dtype, device)
    ref, ref_grads, ref_stats = run(unfused, _run_unfused, torch.float64, "cpu")
    low, low_grads, low_stats = run(unfused, _run_unfused, dtype, "cpu")
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert_all_finite(out, *grads)
    assert_close(out, ref, low, dtype, "out")
    names = ["x", "shortcut"] + [f"block{i}.{n}" for i, b in enumerate(fused) for n, _ in b.named_parameters()]
    for name, g, g_ref, g_low in zip(names, grads, ref_grads, low_grads):
        assert_close(g, g_ref, g_low, dtype, f"grad {name}")
    for i, (s, s_ref, s_low) in enumerate(zip(stats, ref_stats, low_stats)):
        assert_close(s, s_ref, s_low, dtype, f"running stat {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_folds_into_the_conv(backend, monkeypatch):
    """Eval: one fused_conv2d call per block (BN in the epilogue), no separate batch norm; on
    the torch engine no fused call at all (test_fused_models counts that path's ops)."""
    device = require_backend(backend)
    unfused, fused = _bottleneck(backend, groups=2, device=device)
    calls = []
    from packed_kernels.nn import conv_bn as module
    real_conv, real_bn = module.fused_conv2d, module.batch_norm
    monkeypatch.setattr(module, "fused_conv2d", lambda *a, **k: calls.append("conv") or real_conv(*a, **k))
    monkeypatch.setattr(module, "batch_norm", lambda *a, **k: calls.append("bn") or real_bn(*a, **k))
    for b in unfused + fused:
        b.eval()
    x, shortcut = torch.randn(2, 8, 5, 5, device=device), torch.randn(2, 8, 3, 3, device=device)
    torch.testing.assert_close(_run_fused(fused, x, shortcut), _run_unfused(unfused, x, shortcut),
                               rtol=1e-4, atol=1e-4)
    assert calls == ([] if backend == "torch" else ["conv"] * 3)
    calls.clear()
    for b in fused:
        b.train()
    _run_fused(fused, x, shortcut)
    # BN1, BN2 in the prologues; BN3 + residual + ReLU
    assert calls == ([] if backend == "torch" else ["conv", "conv", "conv", "bn"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_operands_are_reused_until_a_parameter_changes(backend, channels_last, monkeypatch):
    """Without autograd, eval calls reuse the folded BN vectors and the weight laid out for
    the kernels (on the torch engine: the conv's weight and bias with BN folded in); any change
    to a parameter or running statistic (in place, by an optimizer or load_state_dict) rebuilds
    them, so every call matches the unfused modules. Outside the block the torch engine runs
    F.batch_norm, folding nothing."""
    from packed_kernels._layouts import WEIGHT_LAYOUT, kernel_weight
    from packed_kernels.nn import conv_bn as module
    device = require_backend(backend)
    unfused = _pair(8, 12, 3, groups=2).to(device).eval()
    fused = _fused_from(unfused, backend).to(device).eval()
    folds = []
    real_fold = module._folded_batch_norm
    monkeypatch.setattr(module, "_folded_batch_norm", lambda *a: folds.append(1) or real_fold(*a))
    x = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=_fmt(channels_last))

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-5)
    folds_per_call = 0 if backend == "torch" else 1
    check()
    check()
    assert len(folds) == 2 * folds_per_call and not module._INFERENCE_CACHE  # outside: every call
    with pk.nn.reuse_inference_operands():
        check()
        check()
        assert len(folds) == 2 * folds_per_call + 1  # the second call reused the operands
        weight = module._INFERENCE_CACHE[fused.bn][1][0]
        if backend in WEIGHT_LAYOUT:  # stored as the kernels read it: their layout step copies nothing
            assert kernel_weight(weight, backend).data_ptr() == weight.data_ptr()
        changes = (lambda: fused.bn.running_var.mul_(2), lambda: fused.bn.bias.add_(1),
                   lambda: fused.conv.weight.mul_(-1),
                   lambda: fused.load_state_dict(_pair(8, 12, 3, groups=2).state_dict()),
                   lambda: setattr(fused.conv.weight, "data", fused.conv.weight * 2))  # new storage
        for change in changes:
            with torch.no_grad():
                change()
            unfused.load_state_dict(fused.state_dict())
            check()
        assert len(folds) == 2 * folds_per_call + 1 + len(changes)
        fused(x.requires_grad_())  # with autograd the operands are built per call, differentiably
        assert len(folds) == 3 * folds_per_call + 1 + len(changes)
    assert not module._INFERENCE_CACHE
    fused.bn.weight.data.mul_(3)  # unversioned, but outside the block every call folds anew
    unfused.load_state_dict(fused.state_dict())
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_estimators_never_mix(backend):
    """groups = estimators: changing one estimator's input leaves the others' outputs, gradients
    and running statistics bit-identical."""
    device = require_backend(backend)
    estimators = 4
    block = _fused_from(_pair(8, 8, 3, groups=estimators), backend).to(device)
    x = torch.randn(2, 8, 4, 4, device=device)
    x2 = x.clone()
    x2[:, 2:4] = x2[:, 2:4] * 5 + 1  # estimator 1
    grad = torch.randn(2, 8, 4, 4, device=device)

    def run(inp):
        b = copy.deepcopy(block)
        inp = inp.clone().requires_grad_(True)
        out = b(inp)
        grads = torch.autograd.grad(out, [inp, b.conv.weight, b.bn.weight, b.bn.bias], grad)
        return out, grads, (b.bn.running_mean, b.bn.running_var)

    (o1, g1, s1), (o2, g2, s2) = run(x), run(x2)
    keep = [0, 1, 4, 5, 6, 7]
    assert torch.equal(o1[:, keep], o2[:, keep])
    assert torch.equal(g1[0][:, keep], g2[0][:, keep])
    for a, b in zip(list(g1[1:]) + list(s1), list(g2[1:]) + list(s2)):
        assert torch.equal(a[keep], b[keep])
    assert not torch.equal(o1[:, 2:4], o2[:, 2:4])


def test_loads_unfused_state_dicts():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(6)
    bn.train()(torch.randn(3, 6, 2, 2))  # non-default running stats and num_batches_tracked
    sequential = nn.Sequential(conv, bn)
    block = ConvBNAct2d(4, 6, 3, padding=1, groups=2)
    block.load_state_dict(sequential.state_dict())
    assert torch.equal(block.bn.running_mean, bn.running_mean) and int(block.bn.num_batches_tracked) == 1
    assert set(block.state_dict()) == {f"conv.{k}" for k in conv.state_dict()} | {f"bn.{k}" for k in bn.state_dict()}
    wrapped = ConvBNAct2d.from_modules(conv, bn)
    assert wrapped.conv.weight is conv.weight and wrapped.bn.running_var is bn.running_var
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(wrapped.eval()(x), torch.relu(bn.eval()(conv(x))))


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be"):
        ConvBNAct2d(4, 4, 3, activation="gelu")
    block = ConvBNAct2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match="residual cannot be deferred"):
        block(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), defer=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="padding_mode"):
        ConvBNAct2d.from_modules(nn.Conv2d(4, 4, 3, padding_mode="reflect"), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="features"):
        ConvBNAct2d.from_modules(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(5))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_bn_act_on_existing_modules(padding_mode, monkeypatch):
    """The functional form on a PackedConv2d (its inner conv, padding_mode and backend) and a
    torch.nn.BatchNorm2d: the modules' own results and running statistics, over a training
    step with a deferred BN into a second conv, then eval; bn=None; "stock"; bad convs."""
    from packed_kernels.nn import PackedConv2d, conv_bn_act
    first = PackedConv2d(8, 8, 3, alpha=2, num_estimators=2, gamma=2, padding=1,
                         minimum_channels_per_group=1, padding_mode=padding_mode, bias=True)
    second = PackedConv2d(8, 4, 3, alpha=2, num_estimators=2, padding=1, padding_mode=padding_mode)
    bn1, bn2 = nn.BatchNorm2d(16), nn.BatchNorm2d(8)
    with torch.no_grad():
        for bn in (bn1, bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    ref_modules = copy.deepcopy(nn.ModuleList([first, bn1, second, bn2]))
    x, residual = torch.randn(3, 16, 5, 5), torch.randn(3, 8, 5, 5)

    def ours(inp):
        pending = conv_bn_act(inp, first, bn1, defer=True)
        return conv_bn_act(pending, second, bn2, residual=residual)

    def theirs(inp):
        f, b1, s, b2 = ref_modules
        return torch.relu(b2(s(torch.relu(b1(f(inp))))) + residual)

    for training in (True, False):
        for m in (first, bn1, second, bn2, ref_modules):
            m.train(training)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
        for got, want in zip((bn1, bn2), ref_modules[1::2]):
            torch.testing.assert_close(got.running_mean, want.running_mean)
            torch.testing.assert_close(got.running_var, want.running_var)
            assert int(got.num_batches_tracked) == int(want.num_batches_tracked) == 1
    # bn=None: conv + residual (+ activation) in the epilogue
    torch.testing.assert_close(conv_bn_act(x, first, None, residual=x, activation=None),
                               first(x) + x, rtol=1e-5, atol=1e-5)
    pk.nn.set_backend(first, "stock")
    calls = []
    from packed_kernels.nn import conv_bn as module
    real = module.fused_conv2d
    monkeypatch.setattr(module, "fused_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(conv_bn_act(x, first, bn1), torch.relu(bn1(first(x))))
    assert calls == []  # stock: torch's modules, no fused op
    with pytest.raises(TypeError, match="last"):
        conv_bn_act(x, PackedConv2d(8, 4, 1, alpha=2, num_estimators=2, last=True), nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        conv_bn_act(x, nn.Linear(3, 3), bn1)
    with pytest.raises(ValueError, match="features"):
        conv_bn_act(x, second, bn1)
