# SPDX-License-Identifier: Apache-2.0
"""FLOP formulas: FlopCounterMode counts each packed_kernels op as it counts the op's stock torch
equivalent, and a Packed-Ensembles ResNet-50 counts the paper's Table 10 figures."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import packed_kernels as pk
from packed_kernels.models import masksembles_resnet, packed_resnet, resnet
from packed_kernels.nn import set_backend

# "torch" is our ops' reference engine: the op still goes through the registered custom op.
OPS_BACKEND = "torch"


def counted(fn):
    """(total FLOPs, {op name: FLOPs}) of fn() under FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})  # empty when no op was counted
    per_op = {str(op): flops for op, flops in counts.items()}
    return counter.get_total_flops(), per_op


def conv_operands(requires_grad_input=True):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9, requires_grad=requires_grad_input)
    w = torch.randn(12, 2, 3, 3, requires_grad=True)  # 4 groups of 2 -> 3 channels
    b = torch.randn(12, requires_grad=True)
    return x, w, b


def test_grouped_conv2d_counts_as_torch_conv2d():
    x, w, b = conv_operands()
    ours, per_op = counted(lambda: pk.grouped_conv2d(x, w, b, 2, 1, 1, 4, backend=OPS_BACKEND))
    stock, _ = counted(lambda: F.conv2d(x, w, b, 2, 1, 1, 4))
    # 2 * multiply-adds: batch 2, 12 out channels, 5x5 outputs, 2 in channels x 3x3 taps each
    assert stock == 2 * (2 * 12 * 5 * 5 * 2 * 3 * 3)
    assert per_op == {"packed_kernels.grouped_conv2d": stock}
    assert ours == stock


def test_grouped_conv2d_backward_counts_as_torch_convolution_backward():
    x, w, b = conv_operands()
    ours, per_op = counted(
        lambda: pk.grouped_conv2d(x, w, b, 1, 1, 1, 4, backend=OPS_BACKEND).square().sum().backward())
    stock, stock_per_op = counted(lambda: F.conv2d(x, w, b, 1, 1, 1, 4).square().sum().backward())
    assert per_op["packed_kernels.grouped_conv2d_backward"] == stock_per_op["aten.convolution_backward"] > 0
    assert ours == stock


def test_grouped_conv2d_backward_skips_the_input_gradient_nobody_needs():
    """An input that requires no grad (the image at the stem): neither torch nor the op computes
    its gradient, and the counts agree."""
    x, w, b = conv_operands(requires_grad_input=False)
    _, per_op = counted(lambda: pk.grouped_conv2d(x, w, b, 1, 1, 1, 4, backend=OPS_BACKEND).sum().backward())
    _, stock_per_op = counted(lambda: F.conv2d(x, w, b, 1, 1, 1, 4).sum().backward())
    assert per_op["packed_kernels.grouped_conv2d_backward"] == stock_per_op["aten.convolution_backward"] > 0


def fused_call(x, w, b, channel_stats, backward):
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    out_scale, out_shift = torch.rand(12) + 0.5, torch.randn(12)
    result = pk.fused_conv2d(x, w, b, 1, 1, 1, 4, in_scale=scale, in_shift=shift, in_activation="relu",
                             out_scale=out_scale, out_shift=out_shift, activation="relu",
                             channel_stats=channel_stats, backend=OPS_BACKEND)
    if backward:
        out = result[0] if channel_stats else result
        loss = out.square().sum() + (result[2].sum() if channel_stats else 0)
        loss.backward()


@pytest.mark.parametrize("channel_stats", [False, True])
def test_fused_conv2d_counts_its_convolution_only(channel_stats):
    x, w, b = conv_operands()
    ours, per_op = counted(lambda: fused_call(x, w, b, channel_stats, backward=False))
    stock, _ = counted(lambda: F.relu(F.conv2d(F.relu(x), w, b, 1, 1, 1, 4)))
    assert per_op == {"packed_kernels.fused_conv2d": stock} and stock > 0
    assert ours == stock


@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_conv2d_backward_counts_the_gradients_asked_for(input_grad):
    x, w, b = conv_operands(requires_grad_input=input_grad)
    _, per_op = counted(lambda: fused_call(x, w, b, True, backward=True))
    _, stock_per_op = counted(lambda: F.conv2d(x, w, b, 1, 1, 1, 4).square().sum().backward())
    assert per_op["packed_kernels.fused_conv2d_backward"] == stock_per_op["aten.convolution_backward"] > 0


def test_batch_norm_counts_zero_as_torch_batch_norm_and_is_registered():
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    weight, bias = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    ours, per_op = counted(lambda: pk.batch_norm(
        x, None, None, weight, bias, training=True, activation="relu", backend=OPS_BACKEND).sum().backward())
    stock, _ = counted(lambda: F.relu(F.batch_norm(x, None, None, weight, bias, True)).sum().backward())
    assert per_op == {"packed_kernels.batch_norm": 0, "packed_kernels.batch_norm_backward": 0}
    assert ours == stock == 0


def test_ensemble_ops_count_zero_as_softmax_and_reductions_and_are_registered():
    logits = torch.randn(3 * 4, 5, requires_grad=True)

    def ours():
        pk.ensemble_mean(logits, 3, backend=OPS_BACKEND).sum().backward()
        scores = pk.ensemble_scores(logits, 3, backend=OPS_BACKEND)
        (scores.entropy.sum() + scores.mutual_information.sum()).backward()

    total, per_op = counted(ours)
    assert per_op == {f"packed_kernels.{name}": 0 for name in (
        "ensemble_mean", "ensemble_mean_backward", "ensemble_scores", "ensemble_scores_backward")}
    assert total == 0


# ------------------------------------------------------------------------------------------------
# Models: the paper's Table 10 (ImageNet ResNet-50, 224x224, multiply-adds)
# ------------------------------------------------------------------------------------------------

def model_mult_adds(build, backend, batch=1, image=224, train=False):
    """Multiply-adds (FLOPs / 2) of one forward (and backward when `train`), on fake tensors so
    an ImageNet ResNet-50 costs no arithmetic here."""
    with FakeTensorMode():
        model = build().train(train)
        set_backend(model, backend)
        x = torch.randn(batch, 3, image, image)

        def step():
            out = model(x)
            if train:
                out.sum().backward()
        total, per_op = counted(step)
    return total / 2, per_op


# "simt" runs our ops on the CPU (fake tensors never reach its kernels); "stock" runs torch's.
OUR_PATH, STOCK_PATH = "simt", "stock"


@pytest.mark.parametrize("name, build, table_10_g", [
    ("single", lambda: resnet(3, 1000, 50), 4.09),
    ("PE-(3,4,1)", lambda: packed_resnet(3, 1000, 50, num_estimators=4, alpha=3, gamma=1), 9.29),
])
def test_resnet50_counts_table_10_on_our_ops_as_on_stock(name, build, table_10_g):
    ours, per_op = model_mult_adds(build, OUR_PATH)
    stock, stock_per_op = model_mult_adds(build, STOCK_PATH)
    assert "aten.convolution" not in per_op  # the convolutions ran on our ops
    assert any(op.startswith("packed_kernels.") for op in per_op)
    assert "aten.convolution" in stock_per_op
    assert ours == stock
    assert round(ours / 1e9, 2) == table_10_g


def test_training_step_counts_as_stock():
    def build():
        return packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar")
    ours, per_op = model_mult_adds(build, OUR_PATH, batch=2, image=16, train=True)
    stock, _ = model_mult_adds(build, STOCK_PATH, batch=2, image=16, train=True)
    assert per_op["packed_kernels.fused_conv2d_backward"] > 0
    assert ours == stock


def test_masksembles_resnet50_counts_as_stock():
    def build():
        torch.manual_seed(0)
        return masksembles_resnet(3, 1000, 50, num_estimators=4, scale=2.0)
    ours, per_op = model_mult_adds(build, OUR_PATH)
    stock, _ = model_mult_adds(build, STOCK_PATH)
    single, _ = model_mult_adds(lambda: resnet(3, 1000, 50), STOCK_PATH)
    assert "packed_kernels.grouped_conv2d" in per_op
    # in eval each of the 4 members sees the image through a full-width ResNet-50 (the masks
    # zero channels, the convolutions still compute them)
    assert ours == stock == 4 * single
