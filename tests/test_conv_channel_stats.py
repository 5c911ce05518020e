# SPDX-License-Identifier: Apache-2.0
"""fused_conv2d(channel_stats=True): BatchNorm's batch mean and biased variance of the conv
output, from the epilogue's per-tile (sum, M2) partials merged with Chan's formula, on every
backend; stable where the old sum / sum-of-squares statistics cancelled (|mean| >> std)."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels._tile_stats import merge_tile_moments, reference_merge_tile_moments
from packed_kernels.triton import tile_stats

from conftest import require_backend

BACKENDS = ["torch", "triton", "simt", "cuda"]

# y is stored in fp32 before the statistics see it: at |y| ~ 1e4 each value is already off by
# up to ulp/2 = 2^-11 ~ 5e-4, i.e. a relative variance error ~1e-5..1e-4 for std ~ 1 (the
# torch backend, exact two-pass in fp32 over those values, measures 2.5e-5; the 64-row tiles'
# fp32 sums add to that, 1.4e-4 measured on simt). 1e-3 leaves room; E[y^2] - mean^2 in fp32
# misses by O(1) here (ulp(mean^2 ~ 1e8) = 8 against a variance ~ 1), far outside it.
VAR_RTOL = 1e-3
MEAN_RTOL = 1e-6  # a handful of fp32 roundings of the mean itself (2^-24 each)


def _large_mean_conv(device):
    """A grouped 3x3 conv whose output has per-channel |mean| in [1e3, 1e4] (both signs, from
    the bias) and std ~ 1; 2 x 11 x 11 = 242 rows per channel: several row tiles, the last
    one partial, on every backend."""
    n, c_in, c_out, groups, size = 2, 6, 8, 2, 11
    x = torch.randn(n, c_in, size, size).to(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in // groups, 3, 3) / (9 * c_in // groups) ** 0.5
    b = torch.sign(torch.randn(c_out)) * 10 ** (3 + torch.rand(c_out))
    return x.to(device), w.to(device), b.to(device), dict(padding=1, groups=groups)


def _relative(ours, ref):
    return ((ours.double().cpu() - ref) / ref).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_stay_accurate_when_the_mean_dwarfs_the_std(backend):
    device = require_backend(backend)
    x, w, b, args = _large_mean_conv(device)
    out, mean, var = pk.fused_conv2d(x, w, b, **args, channel_stats=True, backend=backend)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (w.shape[0],)

    y64 = F.conv2d(x.cpu().double(), w.cpu().double(), b.cpu().double(), **args)
    ref_var, ref_mean = torch.var_mean(y64, (0, 2, 3), correction=0)
    assert ref_mean.abs().min() >= 1e3 and ref_var.max() <= 25  # the regime this test is about

    # What channel_stats computed before: fp32 sum and sum of squares, var = E[y^2] - mean^2
    # (here with torch's pairwise fp32 sums over the whole channel, more accurate than the old
    # per-tile partials, so the old kernels did no better). It must fail this tolerance, or the
    # test would not guard anything.
    y32 = F.conv2d(x.cpu(), w.cpu(), b.cpu(), **args)
    count = y32.numel() // y32.shape[1]
    naive_mean = y32.sum((0, 2, 3)) / count
    naive_var = (y32 * y32).sum((0, 2, 3)) / count - naive_mean * naive_mean
    assert _relative(naive_var, ref_var) > 100 * VAR_RTOL

    assert _relative(var, ref_var) <= VAR_RTOL, f"{backend}: variance {var} vs {ref_var}"
    assert _relative(mean, ref_mean) <= MEAN_RTOL, f"{backend}: mean {mean} vs {ref_mean}"


def test_merge_of_tile_moments_is_chans_formula():
    """Uneven tiles (the last one partial) merge to the whole column's mean and variance."""
    values = torch.randn(77, 5, dtype=torch.float64) * 3 + 100
    rows_per_tile = 16
    tiles = values.split(rows_per_tile)
    sums = torch.stack([t.sum(0) for t in tiles])
    m2s = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    mean, var = merge_tile_moments(sums, m2s, values.shape[0], rows_per_tile)
    torch.testing.assert_close(mean, values.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(var, values.var(0, correction=0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("rows, rows_per_tile, channels", [(77, 16, 5), (131072, 128, 300), (3, 64, 129)])
def test_triton_merge_matches_the_reference(rows, rows_per_tile, channels):
    """The one-launch merge: many tiles (several BLOCK_T steps), channels past one BLOCK_C,
    a single partial tile; partials as the conv kernels lay them out ((tiles, 2, C), fp32)."""
    device = require_backend("triton")
    tiles = -(-rows // rows_per_tile)
    counts = reference_tile_counts(rows, rows_per_tile, tiles)
    means = torch.randn(tiles, channels, dtype=torch.float64) * 0.1 + 1e3
    partial = torch.stack((means * counts, torch.rand(tiles, channels, dtype=torch.float64) * counts),
                          dim=1).float()
    mean, var = tile_stats.merge_tile_moments(partial[:, 0].to(device), partial[:, 1].to(device),
                                              rows, rows_per_tile)
    ref_mean, ref_var = reference_merge_tile_moments(partial[:, 0].double(), partial[:, 1].double(),
                                                     rows, rows_per_tile)
    assert mean.dtype == var.dtype == torch.float32
    # fp32 partials around 1e3 summed over up to 1024 tiles: a few ulps of the mean; the
    # variance (~1 against a mean ~1e3) inherits the mean's rounding through the deviations
    assert _relative(mean, ref_mean) <= MEAN_RTOL
    assert _relative(var, ref_var) <= VAR_RTOL


def reference_tile_counts(rows, rows_per_tile, tiles):
    return torch.tensor([min(rows_per_tile, rows - t * rows_per_tile) for t in range(tiles)],
                        dtype=torch.float64).unsqueeze(1)


def test_mean_and_var_gradcheck():
    """d mean/dy = 1/n and d var/dy = 2 (y - mean)/n, through the conv to input, weight and
    bias (fp64; the closed-form backward is the same code for every backend)."""
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(6, dtype=torch.float64) * 50).requires_grad_()

    def stats(x, w, b):
        _, mean, var = pk.fused_conv2d(x, w, b, stride=(2, 1), padding=1, groups=2,
                                       channel_stats=True, backend="torch")
        return mean, var
    assert torch.autograd.gradcheck(stats, (x, w, b), eps=1e-6, atol=1e-6, fast_mode=True)
