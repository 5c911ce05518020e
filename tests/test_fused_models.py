# SPDX-License-Identifier: Apache-2.0
"""The models on the fused conv + BN path (packed_kernels.nn.BatchNorm2d as the norm layer) against
the same weights on torch.nn.BatchNorm2d: outputs, input and parameter gradients and running
statistics over training steps, then eval; per backend; and the kernel calls a block makes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import packed_kernels as pk
from packed_kernels.models import PackedResNet, PackedWideResNet
from packed_kernels.models.resnet import BasicBlock, Bottleneck, PackedLayers
from packed_kernels.nn import repeat_targets

from conftest import require_backend
from helpers import assert_close

M = 2


def _tiny(block, norm, dropout_rate):
    """A 3-stage PE-(2,2,2) ResNet, one block per stage (the first with a projection shortcut for
    bottlenecks, the later ones for every block)."""
    return PackedResNet(block, [1, 1, 1], 3, 5, conv_bias=False, num_estimators=M,
                        dropout_rate=dropout_rate, alpha=2, gamma=2, style="cifar", in_planes=4,
                        normalization_layer=norm)


def _train_then_eval(model, x, loss_of, seeds, eval_x):
    """Two SGD steps (dropout masks drawn from `seeds`), then eval: every output, the input and
    parameter gradients of each step, the buffers after training, and the eval output."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    results = []
    model.train()
    for seed in seeds:
        torch.manual_seed(seed)
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        grads = torch.autograd.grad(loss_of(out), [inp, *model.parameters()])
        for p, g in zip(model.parameters(), grads[1:]):
            p.grad = g
        opt.step()
        results += [out, *grads]
    results += [b for name, b in model.named_buffers() if "num_batches" not in name]
    model.eval()
    with torch.no_grad():
        results.append(model(eval_x))
    return results


def _check_against_torch_batch_norm(fused, plain, backend, x, loss_of, eval_x):
    """`fused` (packed_kernels.nn.BatchNorm2d) on `backend` vs `plain` (torch.nn.BatchNorm2d, the
    same weights) in float32, both against `plain` in float64."""
    plain.load_state_dict(fused.state_dict(), strict=True)
    exact = copy.deepcopy(plain).double()
    pk.nn.set_backend(fused, backend)
    seeds = (11, 12)  # the same dropout masks in all three
    ours = _train_then_eval(fused, x, loss_of, seeds, eval_x)
    theirs = _train_then_eval(plain, x, loss_of, seeds, eval_x)
    ref = _train_then_eval(exact, x.double(), loss_of, seeds, eval_x.double())
    assert len(ours) == len(theirs) == len(ref)
    for i, (a, r, t) in enumerate(zip(ours, ref, theirs)):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert_close(a, r, t, torch.float32, f"result {i}")
    assert [int(b) for n, b in fused.named_buffers() if "num_batches" in n] == \
        [int(b) for n, b in plain.named_buffers() if "num_batches" in n] != []


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("dropout_rate", [0.0, 0.25], ids=["deferred", "dropout"])
def test_fused_model_matches_torch_batch_norm(block, dropout_rate):
    """A whole PE ResNet (stem, blocks with identity and projection shortcuts, head)."""
    fused = _tiny(block, pk.nn.BatchNorm2d, dropout_rate)
    plain = _tiny(block, nn.BatchNorm2d, dropout_rate)
    # batch 4 at 8x8: the last stage normalises over 4*2*2 values per channel (fewer makes BN
    # too ill-conditioned for any error comparison)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    _check_against_torch_batch_norm(fused, plain, "torch", x,
                                    lambda out: F.cross_entropy(out, repeat_targets(y, M)),
                                    torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("dropout_rate", [0.0, 0.3], ids=["deferred", "dropout"])
def test_fused_wide_resnet_matches_torch_batch_norm(dropout_rate):
    """Wide-ResNet-10x1: dropout sits between conv1 and bn1, the shortcut joins before bn2."""
    def build(norm):
        return PackedWideResNet(10, 1, 3, 5, True, dropout_rate, M, alpha=2, gamma=1, style="cifar",
                                normalization_layer=norm)
    y = torch.randint(0, 5, (4,))
    _check_against_torch_batch_norm(build(pk.nn.BatchNorm2d), build(nn.BatchNorm2d), "torch",
                                    torch.randn(4, 3, 8, 8),
                                    lambda out: F.cross_entropy(out, repeat_targets(y, M)),
                                    torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("backend", ["torch", "triton", "simt"])
@pytest.mark.parametrize("dropout_rate", [0.0, 0.25], ids=["deferred", "dropout"])
def test_fused_bottleneck_on_each_backend(backend, dropout_rate):
    """A bottleneck block with a projection shortcut on each backend (the whole model is too slow
    under the Triton interpreter)."""
    device = require_backend(backend)
    fused, x = _block(True, projection=True)
    plain = _block(True, projection=True, norm=nn.BatchNorm2d)[0]
    fused.dropout.p = plain.dropout.p = dropout_rate
    fused, plain, x = fused.to(device), plain.to(device), x.to(device)
    g = torch.randn_like(fused.eval()(x))
    _check_against_torch_batch_norm(fused, plain, backend, x, lambda out: (out * g.to(out.dtype)).sum(),
                                    torch.randn_like(x))


class _CountOps(TorchDispatchMode):
    """Counts packed_kernels' fused_conv2d / batch_norm calls and any aten batch norm."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name in ("packed_kernels::fused_conv2d", "packed_kernels::batch_norm",
                    "packed_kernels::grouped_conv2d", "aten::convolution") or "batch_norm" in name:
            self.calls.append(name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def _block(bottleneck: bool, projection: bool, norm=pk.nn.BatchNorm2d):
    """A PE-(2,2,2) block with 4 planes; stride 2 gives it a projection shortcut."""
    cls = Bottleneck if bottleneck else BasicBlock
    in_planes = 4 * cls.expansion
    block = cls(PackedLayers(alpha=2, num_estimators=M, gamma=2, groups=1, conv_bias=False),
                in_planes, 4, 2 if projection else 1, 0.0, norm)
    assert (len(block.shortcut) > 0) == projection
    return block, torch.randn(2, in_planes * 2, 6, 6)


@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("bottleneck", [True, False], ids=["bottleneck", "basic"])
def test_kernel_calls_per_block(bottleneck, projection):
    """On a kernel engine (here the CUDA C++ kernels on the emulator). Eval: one fused conv per
    conv (BN, residual and ReLU in its epilogue), no batch norm. Training: BN + ReLU deferred
    into the next conv's prologue; the block's last BN (with the shortcut and ReLU) is its only
    batch-norm pass, plus the projection shortcut's."""
    require_backend("simt")
    block, x = _block(bottleneck, projection)
    pk.nn.set_backend(block, "simt")
    convs = (3 if bottleneck else 2) + projection
    block.eval()
    with torch.no_grad(), _CountOps() as counted:
        block(x)
    assert counted.calls == ["fused_conv2d"] * convs
    block.train()
    with _CountOps() as counted:
        block(x)
    assert sorted(counted.calls) == ["batch_norm"] * (1 + projection) + ["fused_conv2d"] * convs
    # an active dropout (between the last two convs) materialises the BN before it
    block.dropout.p = 0.5
    with _CountOps() as counted:
        block(x)
    assert counted.calls.count("batch_norm") == 2 + projection
    assert counted.calls.count("fused_conv2d") == convs


@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_blocks_on_cudnn_run_torchs_sequence(projection):
    """The default path (and backend "torch") runs torch's ops: training is cuDNN's conv + one
    batch norm per conv; eval folds BN into the conv's weights inside reuse_inference_operands()
    (conv only), else conv + batch norm."""
    block, x = _block(True, projection)
    convs = 3 + projection
    with _CountOps() as counted:
        block(x)
    assert counted.calls.count("convolution") == convs
    assert sum("batch_norm" in c for c in counted.calls) == convs
    assert len(counted.calls) == 2 * convs  # nothing of ours: no fused or grouped op
    block.eval()
    with torch.no_grad(), pk.nn.reuse_inference_operands():
        block(x)
        with _CountOps() as counted:
            out = block(x)
    assert counted.calls == ["convolution"] * convs
    with torch.no_grad():
        torch.testing.assert_close(out, pk.nn.set_backend(copy.deepcopy(block), "stock")(x),
                                   rtol=1e-5, atol=1e-5)  # folding reorders float32 rounding


def _bytes_allocated_by_a_training_step(model, x) -> int:
    model(x).sum().backward()  # warm: lazily built state is not the step's
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        model(x).sum().backward()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_default_block_on_the_torch_engine_allocates_no_more_than_stock():
    """A PE-(2,4,1) ResNet-50 bottleneck (256 -> 64 planes, alpha 2) with its convs on the torch
    engine: a training step allocates no more bytes than the same block on torch's modules."""
    torch.manual_seed(0)
    block = Bottleneck(PackedLayers(alpha=2, num_estimators=4, gamma=1, groups=1, conv_bias=False),
                       256, 64, 1, 0.0, pk.nn.BatchNorm2d)
    x = torch.randn(4, 512, 8, 8)
    stock = pk.nn.set_backend(copy.deepcopy(block), "stock")
    assert _bytes_allocated_by_a_training_step(block, x) <= _bytes_allocated_by_a_training_step(stock, x)


def test_unfused_blocks_make_no_fused_calls():
    """torch.nn.BatchNorm2d as the norm layer: the modules one after another, as before."""
    model = _tiny(Bottleneck, nn.BatchNorm2d, 0.0)
    with _CountOps() as counted:
        model(torch.randn(2, 3, 8, 8))
    assert "fused_conv2d" not in counted.calls and "batch_norm" not in counted.calls
    assert counted.calls.count("grouped_conv2d") == 1 + 3 * 3 + 3  # stem, 3 convs in 3 blocks, 3 shortcuts
