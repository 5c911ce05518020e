# SPDX-License-Identifier: Apache-2.0
"""The rest of torch-uncertainty 0.13's packed layers: PackedLinear's every implementation,
PackedConv3d and PackedConvTranspose2d, and pk.convert swapping them."""

import pytest
import torch
from torch import nn

import packed_kernels as pk
from packed_kernels.nn import PackedConv3d, PackedConvTranspose2d, PackedLinear

IMPLEMENTATIONS = ("einsum", "full", "conv1d", "sparse")


def block_diagonal(layer: PackedLinear) -> torch.Tensor:
    weight = layer.weight
    return weight.to_dense() if layer.sparse else torch.block_diag(*weight)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("first, last", [(False, False), (True, False), (False, True)])
def test_packed_linear_implementations_compute_the_block_diagonal_linear(implementation, first, last):
    torch.manual_seed(0)
    layer = PackedLinear(8, 6, alpha=2, num_estimators=2, first=first, last=last,
                         implementation=implementation)
    x = torch.randn(3, 5, 8 if first else 16, requires_grad=True)
    out = layer(x)
    dense = nn.functional.linear(x, block_diagonal(layer), layer.bias)
    if last:  # "b ... (m h) -> (m b) ... h"
        dense = dense.reshape(3, 5, 2, -1).permute(2, 0, 1, 3).reshape(6, 5, -1)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_sparse_implementation_stores_upstreams_sparse_block_diagonal_weight():
    torch.manual_seed(0)
    layer = PackedLinear(8, 6, alpha=2, num_estimators=2, implementation="sparse")
    assert layer.sparse and layer.weight.shape == (12, 16) and layer.weight.layout == torch.sparse_coo
    dense = layer.weight.to_dense()
    assert torch.count_nonzero(dense[:6, 8:]) == 0 and torch.count_nonzero(dense[6:, :8]) == 0
    assert torch.count_nonzero(dense[:6, :8]) == 48  # the two 6x8 blocks are filled
    layer.reset_parameters()  # re-initialises from dense blocks, keeps the layout
    assert layer.sparse and not torch.equal(layer.weight.to_dense(), dense)


@pytest.mark.parametrize("implementation", ["dense", "sparse_csr", None])
def test_an_invalid_implementation_set_after_construction_is_refused_at_forward(implementation):
    layer = PackedLinear(8, 6, alpha=2, num_estimators=2)
    layer.implementation = implementation
    with pytest.raises(ValueError, match="unknown implementation"):
        layer(torch.randn(2, 16))


@pytest.mark.parametrize("shape, groups, make", [
    ((2, 8, 5, 4, 6), 4, lambda: PackedConv3d(4, 8, 3, alpha=2, num_estimators=2, padding=1,
                                              minimum_channels_per_group=2, gamma=2)),
    ((8, 5, 4, 6), 2, lambda: PackedConv3d(4, 8, 3, alpha=2, num_estimators=2, stride=2, last=True)),
    ((2, 3, 5, 5, 5), 1, lambda: PackedConv3d(3, 8, (1, 3, 3), alpha=2, num_estimators=2, first=True)),
])
def test_packed_conv3d_is_grouped_conv3d(shape, groups, make):
    torch.manual_seed(0)
    layer = make()
    assert layer.conv.groups == groups
    assert list(layer.state_dict()) == ["conv.weight", "conv.bias"]
    x = torch.randn(shape)
    out = layer(x)
    expected = layer.conv(x)
    if layer.last:  # estimator-major: "b (m c) ... -> (m b) c ..."
        batch = 1 if x.dim() == 4 else x.shape[0]
        expected = expected.reshape(batch, 2, -1, *expected.shape[-3:]).transpose(0, 1).reshape(
            2 * batch, -1, *expected.shape[-3:])
    torch.testing.assert_close(out, expected)


def test_packed_conv_transpose2d_geometry_and_estimator_major_output():
    torch.manual_seed(0)
    layer = PackedConvTranspose2d(8, 6, 3, alpha=2, num_estimators=2, stride=2, padding=1,
                                  output_padding=1, last=True, minimum_channels_per_group=1)
    assert (layer.extended_in_channels, layer.extended_out_channels, layer.actual_groups) == (16, 12, 2)
    assert list(layer.state_dict()) == ["conv_transpose.weight", "conv_transpose.bias"]
    x = torch.randn(3, 16, 4, 4)
    out = layer(x)
    full = layer.conv_transpose(x)
    assert full.shape == (3, 12, 8, 8) and out.shape == (6, 6, 8, 8)
    torch.testing.assert_close(out[:3], full[:, :6])  # member 0's rows, then member 1's
    torch.testing.assert_close(out[3:], full[:, 6:])
    with pytest.raises(ValueError, match="PackedConvTranspose2d"):
        PackedConvTranspose2d(7, 6, 3, alpha=1, num_estimators=2)


# ------------------------------------------------------------------------------------------------
# against torch-uncertainty, where it is installed
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("first, last, gamma", [(False, False, 2), (True, False, 1), (False, True, 1)])
def test_packed_linear_matches_torch_uncertainty_when_installed(implementation, first, last, gamma):
    tu = pytest.importorskip("torch_uncertainty.layers.packed")
    torch.manual_seed(0)
    kwargs = dict(alpha=2, num_estimators=2, gamma=gamma, first=first, last=last,
                  implementation=implementation)
    theirs, ours = tu.PackedLinear(8, 8, **kwargs), PackedLinear(8, 8, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 8 if first else 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    theirs.implementation = ours.implementation = "mystery"
    with pytest.raises(ValueError):
        theirs(x)
    with pytest.raises(ValueError):
        ours(x)


@pytest.mark.parametrize("kwargs", [
    dict(alpha=2, num_estimators=2, gamma=2, minimum_channels_per_group=2, padding=1),
    dict(alpha=2, num_estimators=4, stride=2, dilation=2, last=True),
    dict(alpha=1, num_estimators=2, first=True, padding=(0, 1, 1))])
def test_packed_conv3d_matches_torch_uncertainty_when_installed(kwargs):
    tu = pytest.importorskip("torch_uncertainty.layers.packed")
    torch.manual_seed(0)
    theirs, ours = tu.PackedConv3d(8, 8, 3, **kwargs), PackedConv3d(8, 8, 3, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, theirs.conv.in_channels, 6, 6, 6)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("kwargs", [
    dict(alpha=2, num_estimators=2, gamma=2, minimum_channels_per_group=2, padding=1),
    dict(alpha=2, num_estimators=4, stride=2, output_padding=1, last=True),
    dict(alpha=1, num_estimators=2, first=True, dilation=2)])
def test_packed_conv_transpose2d_matches_torch_uncertainty_when_installed(kwargs):
    tu = pytest.importorskip("torch_uncertainty.layers.packed")
    torch.manual_seed(0)
    theirs, ours = tu.PackedConvTranspose2d(8, 8, 3, **kwargs), PackedConvTranspose2d(8, 8, 3, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.actual_groups == theirs.actual_groups
    x = torch.randn(2, theirs.extended_in_channels, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_convert_swaps_every_upstream_packed_layer_when_installed():
    tu = pytest.importorskip("torch_uncertainty.layers.packed")
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = tu.PackedConvTranspose2d(3, 8, 2, alpha=2, num_estimators=2, stride=2, first=True)
            self.volume = tu.PackedConv3d(8, 8, 3, alpha=2, num_estimators=2, padding=1)
            self.head = tu.PackedLinear(8, 5, alpha=2, num_estimators=2, last=True,
                                        implementation="sparse")

        def forward(self, x):
            x = self.up(x).unsqueeze(2)  # a depth of 1
            x = self.volume(x).mean(dim=(2, 3, 4))
            return self.head(x)

    model = Net().eval()
    x = torch.randn(2, 3, 4, 4)
    before, keys = model(x), list(model.state_dict())
    pk.convert(model)
    assert isinstance(model.up, PackedConvTranspose2d) and isinstance(model.volume, PackedConv3d)
    assert isinstance(model.head, PackedLinear) and model.head.implementation == "sparse"
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before)


def test_convert_a_torch_uncertainty_unet_when_installed():
    unet = pytest.importorskip("torch_uncertainty.models.segmentation.unet.packed")
    torch.manual_seed(0)
    model = unet.packed_small_unet(in_channels=3, num_classes=2, alpha=2, num_estimators=2).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    pk.convert(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "PackedConvTranspose2d" in kinds
    assert all(type(m).__module__.startswith("packed_kernels") for m in model.modules()
               if type(m).__name__.startswith("Packed"))
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
