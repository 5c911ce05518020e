# SPDX-License-Identifier: Apache-2.0
"""packed_kernels.models: parameter counts against torch-uncertainty 0.13 (counted with its own
code) and the paper, the baselines' reductions, forward/backward of every model at tiny size,
and ecosystem behaviour (compile, autocast, channels_last, DDP, serialisation, dtypes)."""

import copy
import io
import os
import pickle
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import packed_kernels as pk
from packed_kernels.models import (MIMOResNet, PackedResNet, PackedWideResNet,
                                   batched_resnet, deep_ensemble_resnet, mimo_resnet, packed_resnet,
                                   packed_wideresnet28x10, resnet)
from packed_kernels.models.resnet import _BasicBlock
from packed_kernels.nn import repeat_targets

from helpers import relative_error

ALL_ARCHS = (18, 20, 34, 44, 50, 56, 101, 110, 152)


def _count(build):
    with torch.device("meta"):  # parameter shapes only: no memory, no init time
        model = build()
    return sum(p.numel() for p in model.parameters())


# Counted by running torch-uncertainty 0.13.0's own model constructors (packed_resnet,
# packed_wideresnet28x10, resnet, mimo_resnet, batched_resnet; in_channels=3): the paper's
# CIFAR-10 ResNet-50 numbers are PE-(2,4,2) 14.55 M, PE-(2,4,1) ~23.6 M, single 23.5 M, DE 94 M.
PACKED_RESNET_COUNTS = [
    # (arch, classes, M, alpha, gamma, style, params)
    (50, 10, 4, 2, 2, "cifar", 14_552_232),
    (50, 10, 4, 2, 1, "cifar", 23_596_200),
    (50, 100, 4, 2, 1, "imagenet", 23_980_560),
    (18, 10, 4, 2, 2, "cifar", 8_175_784),
    (18, 100, 4, 2, 1, "imagenet", 11_298_320),
    (20, 10, 4, 2, 2, "cifar", 275_144),
    (34, 10, 4, 2, 2, "cifar", 15_932_072),
    (44, 100, 4, 2, 1, "imagenet", 681_520),
    (56, 10, 4, 2, 2, "cifar", 861_128),
    (101, 10, 4, 2, 2, "cifar", 26_354_856),
    (110, 100, 4, 2, 1, "imagenet", 1_755_824),
    (152, 10, 4, 2, 2, "cifar", 36_506_792),
    (152, 100, 4, 2, 1, "imagenet", 58_714_640),
]


@pytest.mark.parametrize("arch,classes,m,alpha,gamma,style,expected", PACKED_RESNET_COUNTS)
def test_packed_resnet_parameter_count_matches_torch_uncertainty(arch, classes, m, alpha, gamma,
                                                                 style, expected):
    assert _count(lambda: packed_resnet(3, classes, arch, m, alpha, gamma, style=style)) == expected


@pytest.mark.parametrize("m,alpha,gamma,style,expected", [
    (4, 2, 2, "cifar", 19_372_200), (4, 2, 1, "cifar", 36_524_200),
    (4, 2, 2, "imagenet", 19_376_040), (1, 1, 1, "cifar", 36_489_290)])
def test_packed_wideresnet_parameter_count_matches_torch_uncertainty(m, alpha, gamma, style, expected):
    assert _count(lambda: packed_wideresnet28x10(3, 10, m, alpha, gamma, style=style)) == expected


@pytest.mark.parametrize("arch,style,single,mimo,batch_ensemble", [
    (50, "cifar", 23_520_842, 23_614_056, 23_831_452),
    (18, "imagenet", 11_181_642, 11_230_056, 11_229_212),
    (20, "cifar", 272_474, 276_504, 280_844),
    (110, "imagenet", 1_732_634, 1_745_784, 1_781_324),
])
def test_baseline_parameter_counts_match_torch_uncertainty(arch, style, single, mimo, batch_ensemble):
    assert _count(lambda: resnet(3, 10, arch, style=style)) == single
    assert _count(lambda: packed_resnet(3, 10, arch, 1, 1, 1, style=style)) == single  # PE-(1,1,1)
    assert _count(lambda: mimo_resnet(3, 10, arch, 4, style=style)) == mimo
    assert _count(lambda: batched_resnet(3, 10, arch, 4, style=style)) == batch_ensemble
    assert _count(lambda: deep_ensemble_resnet(3, 10, arch, 4, style=style)) == 4 * single


def _expected_resnet_keys(arch, batch_ensemble, conv_bias):
    """torch-uncertainty 0.13's state_dict keys, in order, for its packed_resnet / batched_resnet
    layout: a PackedConv2d holds `conv`; a BatchConv2d holds `conv` plus r_group, s_group and a
    per-member bias; the BatchEnsemble basic block's projection is a plain (grouped) Conv2d."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

    def conv(name, bias=conv_bias, batched=batch_ensemble):
        if not batched:
            return [f"{name}.conv.weight"] + ([f"{name}.conv.bias"] if bias else [])
        # a module's own parameters come before its children's in a state_dict
        return [f"{name}.r_group", f"{name}.s_group"] + ([f"{name}.bias"] if bias else []) + [f"{name}.conv.weight"]

    def norm(name):
        return [f"{name}.{k}" for k in bn]

    bottleneck = arch not in (18, 20, 34, 44, 56, 110)
    expansion = 4 if bottleneck else 1
    stages = [2, 2, 2, 2] if arch == 18 else [3, 4, 6, 3]
    keys = conv("conv1", bias=conv_bias and not batch_ensemble) + norm("bn1")
    in_planes = 64
    for i, (n, planes) in enumerate(zip(stages, (64, 128, 256, 512))):
        for j in range(n):
            b = f"layer{i + 1}.{j}"
            for c in range(1, (4 if bottleneck else 3)):
                keys += conv(f"{b}.conv{c}") + norm(f"{b}.bn{c}")
            if (i > 0 and j == 0) or in_planes != planes * expansion:
                if batch_ensemble and not bottleneck:
                    keys += [f"{b}.shortcut.0.weight"] + ([f"{b}.shortcut.0.bias"] if conv_bias else [])
                else:
                    keys += conv(f"{b}.shortcut.0")
                keys += norm(f"{b}.shortcut.1")
            in_planes = planes * expansion
    if batch_ensemble:
        return keys + ["linear.r_group", "linear.s_group", "linear.bias", "linear.linear.weight"]
    return keys + ["linear.weight", "linear.bias"]


@pytest.mark.parametrize("arch", [18, 50])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_resnet_state_dict_keys_follow_torch_uncertainty(arch, conv_bias):
    """PE and BatchEnsemble share one layout in packed_kernels (models/resnet.py) but keep
    torch-uncertainty's own module names, with either norm layer."""
    for norm in (None, nn.BatchNorm2d):
        with torch.device("meta"):
            pe = packed_resnet(3, 10, arch, 2, 2, 1, conv_bias=conv_bias, normalization_layer=norm)
            be = batched_resnet(3, 10, arch, 2, conv_bias=conv_bias, normalization_layer=norm)
        assert list(pe.state_dict()) == _expected_resnet_keys(arch, False, conv_bias)
        assert list(be.state_dict()) == _expected_resnet_keys(arch, True, conv_bias)


def test_invalid_model_configurations_raise():
    with pytest.raises(ValueError, match="architecture"):
        packed_resnet(3, 10, 42, 4, 2, 1)
    with pytest.raises(ValueError, match="style"):
        packed_resnet(3, 10, 18, 4, 2, 1, style="tiny")
    with pytest.raises(ValueError, match="PackedConv2d"):  # 64*2 channels do not split in 3
        packed_resnet(3, 10, 18, 3, 2, 1)
    with pytest.raises(ValueError, match="6n\\+4"):
        PackedWideResNet(27, 1, 3, 10, True, 0.0, 2)


def test_deep_ensemble_equals_independent_resnets():
    """Member m of the block-diagonal network is exactly a single ResNet holding slice m of every
    tensor (all tensors are stacked member-major along dim 0)."""
    m, b = 3, 2
    ensemble = deep_ensemble_resnet(3, 5, 20, m, width_multiplier=0.25, style="cifar").double()
    ensemble.train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ensemble(x)  # move BN running statistics away from their initial values
    ensemble.eval()
    x = x[:b]
    out = ensemble(x)
    assert out.shape == (m * b, 5)
    for e in range(m):
        member = resnet(3, 5, 20, width_multiplier=0.25, style="cifar").double().eval()
        state = {}
        for key, value in ensemble.state_dict().items():
            state[key] = value if value.dim() == 0 else value.chunk(m, 0)[e].reshape(member.state_dict()[key].shape)
        member.load_state_dict(state, strict=True)
        assert relative_error(out[e * b:(e + 1) * b], member(x)) < 1e-12


def test_mimo_and_batch_ensemble_are_estimator_major():
    m, b = 2, 3
    x = torch.randn(b, 3, 8, 8)
    mimo = mimo_resnet(3, 4, 20, m, width_multiplier=0.25, style="cifar").eval()
    out = mimo(x)
    assert out.shape == (m * b, 4)
    # eval shows every subnetwork the same images: the stacked input is [x, x] on channels
    stacked = torch.cat([x, x], 1)
    heads = PackedResNet.forward(mimo, stacked).reshape(b, m, 4)
    for e in range(m):
        assert torch.allclose(out[e * b:(e + 1) * b], heads[:, e], rtol=0, atol=0)
    mimo.train()
    assert mimo(torch.randn(m * b, 3, 8, 8)).shape == (m * b, 4)
    with pytest.raises(ValueError, match="MIMOResNet"):
        mimo(torch.randn(m * b + 1, 3, 8, 8))

    be = batched_resnet(3, 4, 20, m, width_multiplier=0.25, style="cifar").eval()
    out = be(x)
    assert out.shape == (m * b, 4)
    stock = pk.nn.set_backend(copy.deepcopy(be), "stock")  # torch's conv path, same function
    assert relative_error(stock(x), out) < 1e-5
    with torch.no_grad():  # member 1 with member 0's fast weights reproduces member 0's rows
        for module in be.modules():
            for name in ("r_group", "s_group", "bias"):
                t = getattr(module, name, None)
                if isinstance(t, nn.Parameter) and t.dim() == 2 and t.shape[0] == m:
                    t[1] = t[0]
    same = be(x)
    assert relative_error(same[b:], same[:b]) < 1e-6
    assert relative_error(same[:b], out[:b]) < 1e-6


def _tiny_models():
    """Every model family at tiny width (arch coverage: basic + bottleneck, 3 and 4 stages)."""
    kw = dict(width_multiplier=0.125, style="cifar")
    models = {f"packed_resnet{a}": (lambda a=a: packed_resnet(3, 5, a, 2, 2, 2, **kw)) for a in ALL_ARCHS}
    models.update({
        "packed_resnet18_imagenet": lambda: packed_resnet(3, 5, 18, 2, 2, 1, width_multiplier=0.25),
        "packed_wideresnet": lambda: PackedWideResNet(10, 1, 3, 5, True, 0.3, 2, alpha=2, gamma=2),
        "resnet50": lambda: resnet(3, 5, 50, **kw),
        "deep_ensemble_resnet18": lambda: deep_ensemble_resnet(3, 5, 18, 2, **kw),
        "mimo_resnet50": lambda: mimo_resnet(3, 5, 50, 2, **kw),
        "batched_resnet50": lambda: batched_resnet(3, 5, 50, 2, **kw),
        "batched_resnet18": lambda: batched_resnet(3, 5, 18, 2, **kw),
    })
    return models


DEEP = ("packed_resnet101", "packed_resnet110", "packed_resnet152")  # 33-54 blocks: seconds each


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n
                                  for n in _tiny_models()])
def test_every_model_runs_forward_and_backward(name):
    model = _tiny_models()[name]().train()
    m = getattr(model, "num_estimators", 1)
    b = 2
    x = torch.randn(m * b if isinstance(model, MIMOResNet) else b, 3, 4, 4)
    out = model(x)
    assert out.shape == (m * b, 5)
    loss = F.cross_entropy(out, repeat_targets(torch.randint(0, 5, (b,)), m))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:b]).shape == (m * b, 5)


def _tiny_pe(**kw):
    """A 3-stage PE-(2,2,2) ResNet with one basic block per stage: fast to compile and spawn."""
    return PackedResNet(_BasicBlock, [1, 1, 1], 3, 5, conv_bias=False, num_estimators=2,
                        dropout_rate=0.0, alpha=2, gamma=2, style="cifar", in_planes=4, **kw)


def test_a_few_training_steps_reduce_the_loss():
    model = _tiny_pe().train()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), repeat_targets(y, 2))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_predict_gives_scores_for_a_model():
    model = _tiny_pe()
    scores = pk.nn.predict(model, torch.randn(3, 3, 8, 8))
    assert scores.probs.shape == (3, 5)
    assert torch.allclose(scores.probs.sum(1), torch.ones(3), atol=1e-6)
    assert model.training


def test_serialisation_deepcopy_pickle_and_state_dict():
    model = _tiny_pe().eval()
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), out)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = _tiny_pe().eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), strict=True)
    assert torch.equal(fresh(x), out)


def test_dtype_no_grad_inference_mode_and_channels_last():
    model = _tiny_pe().eval()
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), out) and model(x).grad_fn is None
    with torch.inference_mode():
        assert torch.equal(model(x), out)
    ref = copy.deepcopy(model).double()(x.double())
    assert ref.dtype == torch.float64
    assert relative_error(out, ref) < 1e-5  # float32 vs float64 through a few convs
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert relative_error(cl(x.to(memory_format=torch.channels_last)), ref) < 1e-5
    assert model.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype):
    model = _tiny_pe().train()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    ref = copy.deepcopy(model).double()(x.double())
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = F.cross_entropy(out.float(), repeat_targets(y, 2))
    assert out.dtype == dtype
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps 8 mantissa bits (relative rounding 2**-8 = 0.4%) per op, fp16 11; a handful
    # of convs and batch norms in a row stay well inside 5%.
    assert relative_error(out, ref) < 5e-2


def test_compile_fullgraph_forward_backward():
    model = _tiny_pe().train()
    # aot_eager: dynamo capture + AOT autograd through the ops' fake kernels, without inductor's
    # C++ code generation (minutes on a 2-core CPU runner; it adds nothing about our ops).
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
    reference = copy.deepcopy(model)
    out = compiled(x)
    F.cross_entropy(out, repeat_targets(y, 2)).backward()
    ref_out = reference(x)
    F.cross_entropy(ref_out, repeat_targets(y, 2)).backward()
    assert relative_error(out, ref_out) < 1e-5
    for p, q in zip(model.parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) < 1e-4  # same math, differently ordered fp32 sums


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, state, x, y, result_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _tiny_pe()
        model.load_state_dict(state)
        model.eval()  # BN on running statistics: per-process batch statistics would differ
        ddp = DistributedDataParallel(model)
        shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        F.cross_entropy(ddp(x[shard]), repeat_targets(y[shard], 2)).backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], result_path)
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_matches_one_process(tmp_path):
    import torch.multiprocessing as mp
    model = _tiny_pe()
    model.train()
    model(torch.randn(8, 3, 8, 8))  # non-trivial BN running statistics
    model.eval()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    result = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), model.state_dict(), x, y, str(result)), nprocs=2,
             join=True)
    ddp_grads = torch.load(result, weights_only=True)
    F.cross_entropy(model(x), repeat_targets(y, 2)).backward()
    for got, want in zip(ddp_grads, [p.grad for p in model.parameters()]):
        assert relative_error(got, want) < 1e-5  # mean of two half-batch means, in fp32


def test_fused_batch_norm_blocks_equal_unfused_ones():
    """With packed_kernels.nn.BatchNorm2d the blocks run on the fused conv + BN path (and
    BatchEnsemble's fuse BN + residual + ReLU); with torch's BatchNorm2d they run the modules
    apart. Same state_dict, same outputs and gradients."""
    packed_bn = pk.nn.BatchNorm2d
    # Inputs large enough that the last stage normalises over >= 8 values per channel: with 2
    # (batch 2 at 1x1) BN is so ill-conditioned (gradients ~1e10) that the fused path's
    # differently ordered float64 sums already differ from torch's by 1e-4.
    for build, hw in ((lambda norm: packed_resnet(3, 5, 18, 2, 2, 1, width_multiplier=0.125,
                                                  style="cifar", normalization_layer=norm), 16),
                      (lambda norm: packed_resnet(3, 5, 50, 2, 2, 1, width_multiplier=0.125,
                                                  normalization_layer=norm), 64),
                      (lambda norm: batched_resnet(3, 5, 50, 2, width_multiplier=0.125, style="cifar",
                                                   normalization_layer=norm), 8),
                      (lambda norm: PackedWideResNet(10, 1, 3, 5, True, 0.0, 2, alpha=2, gamma=1,
                                                     style="cifar", normalization_layer=norm), 8)):
        fused, plain = build(packed_bn).double(), build(nn.BatchNorm2d).double()
        assert fused.layer1[0].fused and not plain.layer1[0].fused
        plain.load_state_dict(fused.state_dict(), strict=True)
        x = torch.randn(2, 3, hw, hw, dtype=torch.float64)
        out_f, out_p = fused(x), plain(x)  # training mode: batch statistics, running stats move
        assert relative_error(out_f, out_p) < 1e-10
        for a, b in zip(torch.autograd.grad(out_f.sum(), list(fused.parameters())),
                        torch.autograd.grad(out_p.sum(), list(plain.parameters()))):
            if b.norm() < 1e-12:  # exactly zero in exact math (a conv bias before training-mode
                assert a.norm() < 1e-12  # BN): both are rounding noise, not comparable
                continue
            assert relative_error(a, b) < 1e-10
        for (key, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
            # running statistics moved alike; pk.batch_norm hands its batch statistics back in
            # float32 even for float64 input (ops/batch_norm.py), so they agree to fp32 rounding
            assert relative_error(a, b) < 1e-6, key
        plain.load_state_dict(fused.state_dict())  # eval on identical running statistics
        fused.eval(), plain.eval()
        assert relative_error(fused(x), plain(x)) < 1e-10


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=pytest.mark.slow),  # ~30 s of Triton interpreter on a CPU
    "cuda", "simt"])
def test_tiny_model_on_each_kernel_backend(backend):
    """A whole PE ResNet (stem, blocks, shortcuts, fused BN, head) through one kernel backend:
    forward and parameter gradients as good as torch's own fp32 against float64."""
    from conftest import require_backend
    from helpers import assert_close
    device = require_backend(backend)
    model = _tiny_pe().to(device).train()
    # batch 4 at 8x8: the last stage's BN still normalises over 4*2*2 values per channel (a
    # tinier map leaves 2 values, and its ill-conditioned variance swamps any error comparison)
    x, y = torch.randn(4, 3, 8, 8, device=device), torch.randint(0, 5, (4,), device=device)

    def run(net, inputs):
        out = net(inputs)
        loss = F.cross_entropy(out, repeat_targets(y.to(out.device), 2))
        return (out, *torch.autograd.grad(loss, list(net.parameters())))

    exact = run(copy.deepcopy(model).cpu().double(), x.cpu().double())
    stock = run(pk.nn.set_backend(copy.deepcopy(model), "stock"), x)
    pk.nn.set_backend(model, backend)
    ours = run(model, x)
    for i, (a, ref, theirs) in enumerate(zip(ours, exact, stock)):
        assert_close(a, ref, theirs, torch.float32, "logits" if i == 0 else f"grad {i - 1}")
