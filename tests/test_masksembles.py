# SPDX-License-Identifier: Apache-2.0
"""Masksembles: mask generation, the masked layers and the ResNet (torch-uncertainty 0.13's
masked_resnet: same names, parameter counts and, for the same masks, outputs)."""

import numpy as np
import pytest
import torch

from packed_kernels.models import masksembles_resnet
from packed_kernels.nn import MaskedConv2d, MaskedLinear, set_backend
from packed_kernels.nn.masksembles import ChannelMasks, masks_for_channels


@pytest.mark.parametrize("channels, num_masks, scale", [(64, 4, 2.0), (10, 4, 2.0), (100, 3, 1.5),
                                                        (2048, 4, 2.0)])
def test_masks_are_binary_use_every_channel_and_keep_the_same_count_per_member(channels, num_masks, scale):
    masks = masks_for_channels(channels, num_masks, scale, np.random.default_rng(0))
    assert masks.shape == (num_masks, channels)
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert masks.any(axis=0).all()  # a channel no member keeps would be dropped
    ones = masks.sum(axis=1)
    assert (ones == ones[0]).all() and ones[0] < channels  # equal width, and some overlap lost


def test_larger_scale_gives_sparser_masks():
    rng = np.random.default_rng(0)
    kept = [masks_for_channels(256, 4, scale, rng).sum(axis=1)[0] for scale in (1.0, 2.0, 4.0)]
    assert kept[0] == 256 and kept[0] > kept[1] > kept[2]


@pytest.mark.parametrize("channels, scale, match", [(9, 2.0, "at least 10"), (64, 6.5, "scale <= 6")])
def test_mask_generation_refuses_what_upstream_refuses(channels, scale, match):
    with pytest.raises(ValueError, match=match):
        masks_for_channels(channels, 4, scale)


@pytest.mark.parametrize("layer", [
    lambda: MaskedConv2d(16, 8, 3, num_estimators=2, scale=0.5),
    lambda: MaskedLinear(16, 8, num_estimators=2, scale=None)])
def test_layers_refuse_a_scale_below_one(layer):
    with pytest.raises(ValueError, match="scale"):
        layer()


def test_channel_masks_multiply_each_members_block_by_its_mask():
    masks = ChannelMasks(12, 3, 2.0, rng=np.random.default_rng(1))
    x = torch.randn(3 * 2, 12, 4, 4)
    out = masks(x)
    for m in range(3):
        expected = x[2 * m:2 * m + 2] * masks.masks[m].float().view(1, 12, 1, 1)
        assert torch.equal(out[2 * m:2 * m + 2], expected)
    assert not masks.masks.requires_grad
    with pytest.raises(ValueError, match="not divisible"):
        masks(torch.randn(5, 12, 4, 4))


def test_model_outputs_are_estimator_major_and_members_differ():
    torch.manual_seed(0)
    model = masksembles_resnet(3, 5, 18, num_estimators=4, scale=2.0, style="cifar", seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert out.shape == (4 * 2, 5)
    per_member = out.view(4, 2, 5)
    assert not torch.allclose(per_member[0], per_member[1])
    # member 1's rows are what the network gives when every member's block is that image pair
    alone = model(x[1:2]).view(4, 5)
    torch.testing.assert_close(alone, per_member[:, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy, rows", [("paper", 4), ("legacy", 16)])
def test_training_strategies_split_or_repeat_the_batch(strategy, rows):
    model = masksembles_resnet(3, 5, 18, num_estimators=4, style="cifar", repeat_strategy=strategy,
                               seed=0).train()
    assert model(torch.randn(4, 3, 8, 8)).shape == (rows, 5)
    with pytest.raises(ValueError, match="repeat_strategy"):
        masksembles_resnet(3, 5, 18, repeat_strategy="mean")


def test_resnet50_trains_a_step_and_keeps_its_masks():
    torch.manual_seed(0)
    model = masksembles_resnet(3, 10, 50, num_estimators=4, scale=2.0, style="cifar", seed=0).train()
    masks_before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("mask.masks")}
    weight_before = model.layer1[0].conv1.conv.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(weight_before, model.layer1[0].conv1.conv.weight)
    for name, masks in masks_before.items():
        assert torch.equal(masks, model.get_parameter(name))


def test_resnet50_parameter_counts_match_torch_uncertainty():
    model = masksembles_resnet(3, 1000, 50, num_estimators=4, scale=2.0, seed=0)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # torch-uncertainty 0.13's masked_resnet(3, 1000, 50, 4, 2.0): the masks are parameters that
    # need no grad, (4, channels) per masked layer
    assert (total, trainable) == (25_681_832, 25_583_528)


def test_masks_follow_the_seed_and_state_dict_names_are_upstreams():
    a = masksembles_resnet(3, 10, 20, style="cifar", seed=3)
    b = masksembles_resnet(3, 10, 20, style="cifar", seed=3)
    c = masksembles_resnet(3, 10, 20, style="cifar", seed=4)
    assert torch.equal(a.layer1[0].conv1.mask.masks, b.layer1[0].conv1.mask.masks)
    assert not torch.equal(a.layer1[0].conv1.mask.masks, c.layer1[0].conv1.mask.masks)
    keys = set(a.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.mask.masks", "layer1.0.conv1.conv.weight",
            "layer1.0.conv1.conv.bias", "layer2.0.shortcut.0.mask.masks", "layer2.0.shortcut.1.weight",
            "linear.mask.masks", "linear.linear.weight", "linear.linear.bias"} <= keys
    assert "conv1.bias" not in keys


def test_our_ops_and_stock_convolutions_agree():
    model = masksembles_resnet(3, 5, 20, style="cifar", seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    ours = model(x)
    stock = set_backend(model, "stock")(x)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# against torch-uncertainty itself, where it is installed
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, style, strategy", [(18, "cifar", "paper"), (50, "imagenet", "legacy")])
def test_resnet_matches_torch_uncertainty_when_installed(arch, style, strategy):
    tu = pytest.importorskip("torch_uncertainty.models.classification.resnet.masked")
    torch.manual_seed(0)
    theirs = tu.masked_resnet(3, 10, arch, num_estimators=4, scale=2.0, style=style,
                              repeat_strategy=strategy)
    ours = masksembles_resnet(3, 10, arch, num_estimators=4, scale=2.0, style=style,
                              repeat_strategy=strategy, seed=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    ours.load_state_dict(theirs.state_dict(), strict=True)  # their masks and weights
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    for training in (False, True):
        theirs.train(training), ours.train(training)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_layers_match_torch_uncertainty_when_installed():
    tu = pytest.importorskip("torch_uncertainty.layers.masksembles")
    torch.manual_seed(0)
    pairs = [(tu.MaskedConv2d(16, 8, 3, num_estimators=2, scale=2.0, stride=2, padding=1),
              MaskedConv2d(16, 8, 3, num_estimators=2, scale=2.0, stride=2, padding=1),
              torch.randn(4, 16, 7, 7)),
             (tu.MaskedLinear(24, 5, num_estimators=3, scale=1.5), MaskedLinear(24, 5, 3, 1.5),
              torch.randn(6, 24))]
    for theirs, ours, x in pairs:
        ours.load_state_dict(theirs.state_dict(), strict=True)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
