# SPDX-License-Identifier: Apache-2.0
"""packed_kernels.nn: the Packed-Ensembles layers against an independent re-statement of
torch-uncertainty 0.13's rules (channel rounding, gamma fallback, first/last, estimator-major
outputs, state_dict layout) and against M independent nn.Conv2d / nn.Linear on channel slices."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import packed_kernels as pk
from packed_kernels.nn import (EnsembleMean, GroupedConv2d, PackedConv1d, PackedConv2d,
                               PackedLinear, predict, repeat_targets)

from conftest import require_backend
from helpers import assert_close, relative_error

# float64 everywhere the comparison is exact math (same weights, same sums): 1e-12 is rounding.
EXACT = 1e-12


def _expected_groups(in_channels, alpha, m, gamma, groups, minimum, first):
    """torch-uncertainty's rule, re-stated: groups = gamma*groups*M, gamma drops by one while the
    extended input does not split into groups of >= minimum channels (never below gamma = 1)."""
    if first:
        return 1
    ext_in = int(in_channels * alpha)
    for g in range(gamma, 0, -1):
        if ext_in % (g * groups * m) == 0 and ext_in // (g * groups * m) >= minimum:
            return g * groups * m
    return groups * m


# (in, out, alpha, M, gamma, groups, min_per_group, first, last) and the hand-derived conv shape
GEOMETRY = [
    # ResNet-50 PE-(2,4,2) conv2 of layer1: 64*2=128 in, 8 groups of 16 < 64 -> gamma falls to 1
    ((64, 64, 2, 4, 2, 1, 64, False, False), (128, 128, 4)),
    # layer4: 512*2 = 1024 in, 8 groups of 128 >= 64 -> gamma 2 kept
    ((512, 512, 2, 4, 2, 1, 64, False, False), (1024, 1024, 8)),
    # non-integer alpha rounds down: int(10 * 1.5) = 15 in, int(6 * 1.5) = 9 out, groups 3
    ((10, 6, 1.5, 3, 1, 1, 1, False, False), (15, 9, 3)),
    # first: dense over the shared input; last: out = out_channels * M
    ((3, 16, 2, 4, 1, 1, 64, True, False), (3, 32, 1)),
    ((16, 5, 2, 4, 1, 1, 1, False, True), (32, 20, 4)),
    # per-estimator groups multiply: gamma 2 * groups 2 * M 2 = 8, 48/8 = 6 >= 4
    ((24, 16, 2, 2, 2, 2, 4, False, False), (48, 32, 8)),
    # gamma 3 does not divide 24*2=48 with M=4 (12 groups: 4 per group < 8) -> gamma 1... via 2:
    # 8 groups of 6 < 8 -> gamma 1: 4 groups of 12
    ((24, 24, 2, 4, 3, 1, 8, False, False), (48, 48, 4)),
]


@pytest.mark.parametrize("config,expected", GEOMETRY)
def test_conv_geometry_follows_torch_uncertainty_rules(config, expected):
    i, o, alpha, m, gamma, groups, minimum, first, last = config
    layer = PackedConv2d(i, o, 3, alpha=alpha, num_estimators=m, gamma=gamma, groups=groups,
                         minimum_channels_per_group=minimum, first=first, last=last)
    assert (layer.conv.in_channels, layer.conv.out_channels, layer.conv.groups) == expected
    assert layer.conv.groups == _expected_groups(i, alpha, m, gamma, groups, minimum, first)
    assert list(layer.state_dict()) == ["conv.weight", "conv.bias"]
    assert layer.weight is layer.conv.weight and layer.bias is layer.conv.bias


def _block_diagonal_reference(x, weight, bias, groups, **conv_args):
    """M*gamma independent nn.Conv2d, each on its own slice of input and output channels."""
    cin, cout = x.shape[1] // groups, weight.shape[0] // groups
    outs, convs = [], []
    for g in range(groups):
        conv = nn.Conv2d(cin, cout, weight.shape[2:], bias=bias is not None, dtype=x.dtype, **conv_args)
        with torch.no_grad():
            conv.weight.copy_(weight[g * cout:(g + 1) * cout])
            if bias is not None:
                conv.bias.copy_(bias[g * cout:(g + 1) * cout])
        outs.append(conv(x[:, g * cin:(g + 1) * cin]))
        convs.append(conv)
    return torch.cat(outs, 1), convs


CONV_CASES = [
    # (in, out, kernel, alpha, M, gamma, stride, padding, dilation, bias, padding_mode, last, HxW)
    (6, 4, 3, 2, 2, 1, 1, 1, 1, True, "zeros", False, (7, 7)),
    (6, 9, 3, 1, 3, 1, 2, 0, 1, False, "zeros", True, (9, 8)),
    (8, 8, (3, 1), 2, 2, 2, 1, (1, 0), (2, 1), True, "zeros", False, (7, 5)),
    (6, 4, 3, 2, 2, 1, 1, 1, 1, True, "reflect", True, (6, 5)),
    (4, 4, 3, 1.5, 2, 1, 1, 1, 1, True, "circular", False, (5, 5)),
    (4, 4, 2, 2, 4, 1, 1, "same", 1, True, "zeros", False, (5, 6)),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_packed_conv2d_equals_independent_convs(case):
    i, o, k, alpha, m, gamma, stride, padding, dilation, bias, mode, last, hw = case
    layer = PackedConv2d(i, o, k, alpha=alpha, num_estimators=m, gamma=gamma, stride=stride,
                         padding=padding, dilation=dilation, bias=bias, padding_mode=mode,
                         last=last, minimum_channels_per_group=1, dtype=torch.float64)
    batch = 3
    x = torch.randn(batch, layer.conv.in_channels, *hw, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref, convs = _block_diagonal_reference(x, layer.weight, layer.bias, layer.conv.groups, stride=stride,
                                    padding=padding, dilation=dilation, padding_mode=mode)
    if last:  # "b (m c) h w -> (m b) c h w": rows m*B..m*B+B-1 are estimator m
        c = ref.shape[1] // m
        assert out.shape == (m * batch, c, *ref.shape[2:])
        for e in range(m):
            assert relative_error(out[e * batch:(e + 1) * batch], ref[:, e * c:(e + 1) * c]) < EXACT
    else:
        assert relative_error(out, ref) < EXACT
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, layer.weight], grad)
    if last:
        grad = grad.reshape(m, batch, -1, *out.shape[2:]).transpose(0, 1).reshape(ref.shape)
    theirs = torch.autograd.grad(ref, [x] + [c.weight for c in convs], grad)
    theirs = (theirs[0], torch.cat(theirs[1:], 0))
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) < EXACT


def test_packed_conv2d_first_equals_m_separate_first_layers():
    m, alpha = 4, 2
    layer = PackedConv2d(3, 8, 3, alpha=alpha, num_estimators=m, first=True, padding=1,
                         dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = layer(x)
    per = 8 * alpha // m  # each estimator's share of the alpha-wide output
    for e in range(m):
        sl = slice(e * per, (e + 1) * per)
        ref = F.conv2d(x, layer.weight[sl], layer.bias[sl], padding=1)
        assert relative_error(out[:, sl], ref) < EXACT


def test_packed_conv2d_runs_through_grouped_conv2d(monkeypatch):
    calls = []
    import packed_kernels.nn.packed as packed_module
    real = packed_module.grouped_conv2d
    monkeypatch.setattr(packed_module, "grouped_conv2d", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    layer = PackedConv2d(4, 4, 1, alpha=2, num_estimators=2, minimum_channels_per_group=1)
    layer(torch.randn(1, 8, 3, 3))
    assert calls == [2]


@pytest.mark.parametrize("mode,padding,stride,dilation,last",
                         [("zeros", 1, 1, 1, False), ("replicate", 2, 2, 2, True), ("zeros", "same", 1, 3, False)])
def test_packed_conv1d_equals_nn_conv1d(mode, padding, stride, dilation, last):
    layer = PackedConv1d(6, 4, 3, alpha=2, num_estimators=2, gamma=1, stride=stride, padding=padding,
                         dilation=dilation, padding_mode=mode, last=last, dtype=torch.float64)
    assert list(layer.state_dict()) == ["conv.weight", "conv.bias"]
    x = torch.randn(3, 12, 11, dtype=torch.float64)
    ref = layer.conv(x)  # the inner nn.Conv1d is torch's own grouped conv1d
    out = layer(x)
    if last:
        ref = ref.reshape(3, 2, -1, ref.shape[-1]).transpose(0, 1).reshape(6, -1, ref.shape[-1])
    assert relative_error(out, ref) < EXACT
    if not last:  # unbatched (C, L) input, as nn.Conv1d accepts
        assert relative_error(layer(x[0]), layer.conv(x[0])) < EXACT


LINEAR_CASES = [
    # (in, out, alpha, M, gamma, bias, first, last, lead dims)
    (8, 6, 2, 2, 1, True, False, False, (5,)),
    (12, 10, 2, 2, 1, True, False, True, (3,)),
    (12, 12, 1, 3, 2, False, False, True, (2, 4)),  # gamma 2 and extra dims
    (5, 8, 2, 4, 1, True, True, False, (3,)),
    (5, 7, 2, 3, 1, True, True, True, (2,)),  # first and last: one dense group
    (10, 6, 1.5, 3, 1, True, False, False, (4, 2, 2)),  # int(10 * 1.5) = 15, int(6 * 1.5) = 9
]


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_packed_linear_equals_independent_linears(case):
    i, o, alpha, m, gamma, bias, first, last, lead = case
    layer = PackedLinear(i, o, alpha=alpha, num_estimators=m, gamma=gamma, bias=bias, first=first,
                         last=last, dtype=torch.float64)
    groups = 1 if first else m * gamma
    ext_in, ext_out = int(i * (1 if first else alpha)), int(o * (m if last else alpha))
    assert layer.weight.shape == (groups, ext_out // groups, ext_in // groups)
    assert (layer.groups, layer.in_features, layer.out_features) == (groups, ext_in // groups, ext_out // groups)
    assert list(layer.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    x = torch.randn(*lead, ext_in, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    og, ig = ext_out // groups, ext_in // groups
    pieces, linears = [], []
    for g in range(groups):
        lin = nn.Linear(ig, og, bias=bias, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(layer.weight[g])
            if bias:
                lin.bias.copy_(layer.bias[g * og:(g + 1) * og])
        pieces.append(lin(x[..., g * ig:(g + 1) * ig]))
        linears.append(lin)
    ref = torch.cat(pieces, -1)
    if last:  # "b ... (m h) -> (m b) ... h"
        h = ext_out // m
        ref = torch.cat([ref[..., e * h:(e + 1) * h] for e in range(m)], 0)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < EXACT
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, layer.weight], grad)
    theirs = torch.autograd.grad(ref, [x] + [lin.weight for lin in linears], grad)
    assert relative_error(ours[0], theirs[0]) < EXACT
    assert relative_error(ours[1], torch.stack(theirs[1:])) < EXACT


def test_packed_linear_implementations_share_one_layout():
    torch.manual_seed(1)
    layers = [PackedLinear(8, 4, alpha=2, num_estimators=2, implementation=impl) for impl in ("einsum", "full", "conv1d")]
    for other in layers[1:]:
        other.load_state_dict(layers[0].state_dict(), strict=True)
    x = torch.randn(3, 16)
    assert all(torch.equal(layers[0](x), other(x)) for other in layers[1:])


def test_state_dict_in_torch_uncertainty_layout_loads_strictly():
    """A checkpoint written by torch-uncertainty: conv.weight/conv.bias for convs, a 3-D weight
    and flat bias for PackedLinear (shapes from its rules, written out here by hand)."""
    conv = PackedConv2d(16, 32, 3, alpha=2, num_estimators=4, gamma=2, minimum_channels_per_group=4)
    ckpt = {"conv.weight": torch.randn(64, 4, 3, 3), "conv.bias": torch.randn(64)}
    conv.load_state_dict(ckpt, strict=True)
    assert torch.equal(conv.weight, ckpt["conv.weight"])
    lin = PackedLinear(32, 10, alpha=2, num_estimators=4, last=True)
    lin.load_state_dict({"weight": torch.randn(4, 10, 16), "bias": torch.randn(40)}, strict=True)
    with pytest.raises(RuntimeError):
        lin.load_state_dict({"weight": torch.randn(40, 64), "bias": torch.randn(40)}, strict=True)


@pytest.mark.parametrize("make,error", [
    (lambda: PackedConv2d(4, 4, 3, alpha=None, num_estimators=2), ValueError),
    (lambda: PackedConv2d(4, 4, 3, alpha=0, num_estimators=2), ValueError),
    (lambda: PackedConv2d(4, 4, 3, alpha=2, num_estimators=2, gamma=1.5), TypeError),
    (lambda: PackedConv2d(4, 4, 3, alpha=2, num_estimators=2, gamma=0), ValueError),
    (lambda: PackedConv2d(4, 4, 3, alpha=2, num_estimators=None), ValueError),
    (lambda: PackedConv2d(4, 4, 3, alpha=2, num_estimators=2.0), TypeError),
    (lambda: PackedConv2d(4, 4, 3, alpha=2, num_estimators=0), ValueError),
    (lambda: PackedConv2d(5, 4, 3, alpha=1, num_estimators=2), ValueError),  # in not divisible
    (lambda: PackedConv2d(4, 5, 3, alpha=1, num_estimators=2), ValueError),  # out not divisible
    (lambda: PackedConv2d(4, 4, 3, alpha=1, num_estimators=2, padding_mode="mirror"), ValueError),
    (lambda: PackedConv1d(3, 4, 3, alpha=1, num_estimators=2), ValueError),
    (lambda: PackedLinear(5, 4, alpha=1, num_estimators=2), ValueError),
    (lambda: PackedLinear(4, 5, alpha=1, num_estimators=2), ValueError),
    (lambda: PackedLinear(4, 4, alpha=1, num_estimators=2, implementation="dense"), ValueError),
    (lambda: PackedConv2d(4, 4, 3, alpha=float("nan"), num_estimators=2), ValueError),
    (lambda: PackedConv2d(4, 4, 3, alpha=float("inf"), num_estimators=2), ValueError),
])
def test_invalid_configurations_raise(make, error):
    with pytest.raises(error, match=r"Packed(Conv[12]d|Linear)"):
        make()


def test_bad_inputs_raise_before_compute():
    layer = PackedConv2d(4, 4, 3, alpha=1, num_estimators=2)
    with pytest.raises(ValueError, match="input channels"):
        layer(torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="PackedLinear"):
        PackedLinear(4, 4, alpha=1, num_estimators=2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="PackedConv1d"):
        PackedConv1d(4, 4, 3, alpha=1, num_estimators=2)(torch.randn(1, 1, 4, 9))


@pytest.mark.parametrize("backend", ["torch", "triton", "simt"])
def test_empty_and_unbatched_inputs_answer_as_torch(backend):
    """An empty batch gives torch's empty output (and gradients; BatchNorm's running statistics
    unchanged, its batch count moved); an unbatched input is a batch of one without its dim."""
    require_backend(backend)
    torch.manual_seed(0)
    conv2d = PackedConv2d(4, 8, 3, alpha=2, num_estimators=2, padding=1)
    conv1d = PackedConv1d(4, 8, 3, alpha=2, num_estimators=2)
    last = PackedConv2d(4, 6, 3, alpha=2, num_estimators=2, last=True)
    bn = pk.nn.BatchNorm2d(8)
    for layer in (conv2d, conv1d, last, bn):
        layer.backend = backend
    for layer, shape in ((conv2d, (0, 8, 5, 5)), (conv1d, (0, 8, 7)), (bn, (0, 8, 3, 3))):
        x = torch.randn(shape, requires_grad=True)
        stock = copy.deepcopy(layer)
        stock.backend = "stock" if layer is not bn else None
        expected = (stock.conv(x) if layer is not bn else nn.BatchNorm2d.forward(stock, x))
        out = layer(x)
        assert out.shape == expected.shape
        out.sum().backward()
        assert x.grad.shape == x.shape
    assert torch.equal(bn.running_mean, torch.zeros(8)) and bn.num_batches_tracked == 1
    for layer, x in ((conv2d, torch.randn(8, 5, 5)), (conv1d, torch.randn(8, 7)), (last, torch.randn(8, 5, 5))):
        batched = layer(x.unsqueeze(0))
        torch.testing.assert_close(layer(x), batched if layer is last else batched.squeeze(0))
    assert last(torch.randn(8, 5, 5)).shape == (2, 6, 3, 3)  # estimator-major: M rows for one sample
    with pytest.raises(ValueError, match="PackedConv2d: input must have 4 dimensions"):
        conv2d(torch.randn(1, 1, 8, 5, 5))


def test_empty_batch_through_the_fused_models():
    from packed_kernels.models import packed_resnet
    model = packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar")
    for mode in (model.train, model.eval):
        mode()
        out = model(torch.randn(0, 3, 8, 8))
        assert out.shape == (0, 10)


def test_grouped_conv2d_module_keeps_nn_conv2d_state_and_outputs():
    conv = nn.Conv2d(6, 9, 3, stride=2, padding=1, groups=3, padding_mode="reflect")
    ours = GroupedConv2d.from_conv2d(conv)
    assert ours.weight is conv.weight and ours.bias is conv.bias
    assert ours.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, 6, 7, 7)
    assert relative_error(ours(x), conv(x)) < 1e-6  # float32: same sums in another order


# ---------------------------------------------------------------------------------------------
# ensemble head
# ---------------------------------------------------------------------------------------------

def test_repeat_targets_is_estimator_major():
    t = torch.tensor([3, 1, 4])
    assert repeat_targets(t, 2).tolist() == [3, 1, 4, 3, 1, 4]
    assert EnsembleMean(3).repeat_targets(t).shape == (9,)
    dense = torch.randint(0, 5, (2, 4, 4))
    assert torch.equal(repeat_targets(dense, 3)[4:6], dense)
    with pytest.raises(ValueError):
        repeat_targets(t, 0)


def test_ensemble_mean_head_and_predict():
    m, b, c = 3, 4, 5
    logits = torch.randn(m * b, c) * 3
    head = EnsembleMean(m)
    ref = torch.softmax(logits.double().view(m, b, c), -1).mean(0)
    assert relative_error(head(logits), ref) < 1e-6
    scores = head.scores(logits)
    assert relative_error(scores.probs, ref) < 1e-6

    model = nn.Sequential(nn.Linear(6, c * m))
    model.num_estimators = m
    to_logits = lambda x: model[0](x).view(x.shape[0], m, c).transpose(0, 1).reshape(m * x.shape[0], c)  # noqa: E731
    wrapper = _Lambda(to_logits, m)
    wrapper.train()
    x = torch.randn(b, 6)
    got = predict(wrapper, x)
    assert wrapper.training, "predict restores the train mode"
    assert relative_error(got.probs, torch.softmax(to_logits(x).double().view(m, b, c), -1).mean(0)) < 1e-6
    assert got.entropy.shape == (b,)
    with pytest.raises(ValueError, match="num_estimators"):
        predict(nn.Identity(), x)


class _Lambda(nn.Module):
    def __init__(self, fn, m):
        super().__init__()
        self.fn, self.num_estimators, self.seen_training = fn, m, []

    def forward(self, x):
        self.seen_training.append(self.training)
        assert not self.training, "predict runs the model in eval mode"
        return self.fn(x)


# ---------------------------------------------------------------------------------------------
# ecosystem behaviour of the layers (models are covered in test_models.py)
# ---------------------------------------------------------------------------------------------

def _tiny_stack():
    return nn.Sequential(
        PackedConv2d(3, 8, 3, alpha=2, num_estimators=2, first=True, padding=1),
        nn.ReLU(),
        PackedConv2d(8, 8, 3, alpha=2, num_estimators=2, gamma=2, padding=1, minimum_channels_per_group=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        PackedLinear(8, 5, alpha=2, num_estimators=2, last=True))


def test_layers_deepcopy_pickle_state_dict_roundtrip():
    model = _tiny_stack().eval()
    x = torch.randn(2, 3, 6, 6)
    out = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), out)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = _tiny_stack().eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), strict=True)
    assert torch.equal(fresh(x), out)


def test_layers_to_dtype_autocast_and_channels_last():
    model = _tiny_stack().eval()
    x = torch.randn(2, 3, 6, 6)
    ref = model.double()(x.double())
    model = model.float()
    assert model[0].weight.dtype == torch.float32 and model[-1].weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    # bf16 has 8 bits of mantissa: a few roundings through 2 convs and a linear stay under 5%
    assert relative_error(low, ref) < 5e-2
    cl = model.to(memory_format=torch.channels_last)
    out_cl = cl(x.to(memory_format=torch.channels_last))
    assert relative_error(out_cl, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# torch-uncertainty itself as the oracle, where it is installed (it is not on CI: its
# dependencies are heavy); the tests above re-state its rules independently.
# ---------------------------------------------------------------------------------------------

ORACLE_CONFIGS = [
    # (in, out, alpha, M, gamma, groups, minimum, first, last)
    (64, 64, 2, 4, 2, 1, 64, False, False), (512, 128, 2, 4, 2, 1, 64, False, False),
    (10, 6, 1.5, 3, 1, 1, 1, False, False), (3, 16, 2, 4, 1, 1, 64, True, False),
    (16, 5, 2, 4, 1, 1, 1, False, True), (24, 16, 2, 2, 2, 2, 4, False, False),
    (24, 24, 2, 4, 3, 1, 8, False, False), (96, 96, 3, 2, 4, 1, 16, False, False),
]


@pytest.mark.parametrize("config", ORACLE_CONFIGS)
def test_layers_match_torch_uncertainty_when_installed(config):
    tu = pytest.importorskip("torch_uncertainty.layers.packed")
    i, o, alpha, m, gamma, groups, minimum, first, last = config
    for theirs_cls, ours_cls, shape in ((tu.PackedConv2d, PackedConv2d, (2, 5, 5)),
                                        (tu.PackedConv1d, PackedConv1d, (2, 7))):
        kwargs = dict(alpha=alpha, num_estimators=m, gamma=gamma, groups=groups, padding=1,
                      minimum_channels_per_group=minimum, first=first, last=last)
        theirs, ours = theirs_cls(i, o, 3, **kwargs), ours_cls(i, o, 3, **kwargs)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(shape[0], theirs.conv.in_channels, *shape[1:])
        assert relative_error(ours(x), theirs(x)) < 1e-6
    if groups == 1:
        kwargs = dict(alpha=alpha, num_estimators=m, gamma=gamma, first=first, last=last)
        try:
            theirs = tu.PackedLinear(i, o, **kwargs)
        except ValueError:
            with pytest.raises(ValueError):
                PackedLinear(i, o, **kwargs)
            return
        ours = PackedLinear(i, o, **kwargs)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(3, 2, int(i * (1 if first else alpha)))
        assert relative_error(ours(x), theirs(x)) < 1e-6


# ---------------------------------------------------------------------------------------------
# convert()
# ---------------------------------------------------------------------------------------------

def _foreign_layer(class_name, base=nn.Module):
    """A stand-in for a torch-uncertainty layer: only its class name and attributes matter."""
    return type(class_name, (base,), {})


def _foreign_packed_conv2d(in_channels, out_channels, groups, m, first=False, last=False):
    layer = _foreign_layer("PackedConv2d")()
    layer.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups)
    layer.num_estimators, layer.first, layer.last = m, first, last

    def forward(x):
        out = layer.conv(x)
        if layer.last:
            out = out.reshape(x.shape[0], m, -1, *out.shape[2:]).transpose(0, 1).flatten(0, 1)
        return out
    layer.forward = forward
    return layer


def _foreign_packed_linear(in_features, out_features, m, last):
    layer = _foreign_layer("PackedLinear")()
    layer.weight = nn.Parameter(torch.randn(m, out_features, in_features) / in_features ** 0.5)
    layer.bias = nn.Parameter(torch.randn(m * out_features))
    layer.num_estimators, layer.first, layer.last, layer.groups = m, False, last, m

    def forward(x):
        w = torch.block_diag(*layer.weight)
        out = F.linear(x, w, layer.bias)
        return out.reshape(x.shape[0], m, -1).transpose(0, 1).flatten(0, 1) if last else out
    layer.forward = forward
    return layer


def test_convert_keeps_weights_keys_and_outputs():
    m = 2
    model = nn.Sequential(
        _foreign_packed_conv2d(3, 8, 1, m, first=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1)),  # dense: left to cuDNN
        _foreign_packed_conv2d(8, 4, 2, m, last=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        _foreign_packed_linear(2, 3, m, last=True))
    model.train()
    x = torch.randn(3, 3, 6, 6)
    model(x)  # one training step of BN statistics before comparing in eval
    model.eval()
    before = model(x)
    keys = list(model.state_dict())
    params = [p for p in model.parameters()]
    converted = pk.convert(model)
    assert converted is model
    assert isinstance(model[0], PackedConv2d) and model[0].first
    assert isinstance(model[3], GroupedConv2d) and isinstance(model[7], PackedConv2d)
    assert type(model[6][0]) is nn.Conv2d
    assert isinstance(model[10], PackedLinear) and model[10].last
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert relative_error(model(x), before) < 1e-6  # float32: same sums, maybe another order
    assert not model[0].training
    assert pk.convert(model) is model  # idempotent


def test_convert_a_single_layer_and_bad_argument():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    assert isinstance(pk.convert(conv), GroupedConv2d)
    with pytest.raises(TypeError, match="nn.Module"):
        pk.convert(torch.randn(3))


def test_set_backend_routes_layers(monkeypatch):
    import packed_kernels.nn.packed as packed_module
    from packed_kernels.nn import set_backend
    model = pk.convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), _tiny_stack_from(4)))
    x = torch.randn(2, 4, 7, 7)
    ref = model(x)
    seen = []
    real = packed_module.grouped_conv2d
    monkeypatch.setattr(packed_module, "grouped_conv2d",
                        lambda *a, **k: seen.append(k.get("backend")) or real(*a, **k))
    assert set_backend(model, "torch") is model
    assert torch.equal(model(x), ref) and seen == ["torch"] * 3
    seen.clear()
    set_backend(model, "stock")  # torch's own modules: no packed_kernels op is called
    assert relative_error(model(x), ref) < 1e-6 and seen == []
    set_backend(model, None)
    model(x)
    assert seen == [None] * 3
    with pytest.raises(ValueError, match="set_backend"):
        set_backend(model, "cudnn")


def _tiny_stack_from(in_channels):
    return nn.Sequential(
        PackedConv2d(in_channels, 8, 3, alpha=2, num_estimators=2, first=True, padding=1),
        PackedConv2d(8, 8, 3, alpha=2, num_estimators=2, padding=1, minimum_channels_per_group=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        PackedLinear(8, 5, alpha=2, num_estimators=2, last=True))


def test_convert_a_torch_uncertainty_model_when_installed():
    tu = pytest.importorskip("torch_uncertainty.models.classification.resnet.packed")
    model = tu.packed_resnet(3, 5, 18, 2, 2, 2, style="cifar", width_multiplier=0.25).eval()
    x = torch.randn(2, 3, 8, 8)
    before, keys = model(x), list(model.state_dict())
    pk.convert(model)
    assert isinstance(model.conv1, PackedConv2d) and isinstance(model.linear, PackedLinear)
    assert list(model.state_dict()) == keys
    assert relative_error(model(x), before) < 1e-6


@pytest.mark.parametrize("make,shape", [
    (lambda: PackedConv2d(4, 4, 3, alpha=2, num_estimators=2, padding=1, last=True,
                          minimum_channels_per_group=1), (2, 8, 5, 5)),
    (lambda: PackedConv2d(4, 6, 2, alpha=1, num_estimators=2, padding="same", dilation=2), (1, 4, 6, 5)),
    (lambda: PackedConv1d(4, 4, 3, alpha=2, num_estimators=2, padding=1, padding_mode="reflect",
                          stride=2), (2, 8, 9)),
])
def test_layers_run_on_each_kernel_backend(kernel_backend, make, shape):
    """The layers' arguments (padding pairs/strings, pre-padded modes, the 1-D lift) reach every
    grouped_conv2d kernel intact: same outputs and gradients as the torch backend."""
    from packed_kernels.nn import set_backend
    backend, device = kernel_backend
    layer = make().to(device)
    x = torch.randn(shape, device=device, requires_grad=True)

    def run(module, inputs):
        out = module(inputs)
        return (out, *torch.autograd.grad(out.square().sum(), [inputs, module.weight]))

    exact = run(copy.deepcopy(layer).cpu().double(), x.detach().cpu().double().requires_grad_(True))
    stock = run(set_backend(copy.deepcopy(layer), "torch"), x)  # torch's own error at fp32
    ours = run(set_backend(layer, backend), x)
    for name, a, ref, theirs in zip(("out", "grad_input", "grad_weight"), ours, exact, stock):
        assert_close(a, ref, theirs, torch.float32, name)
