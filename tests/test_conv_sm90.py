# SPDX-License-Identifier: Apache-2.0
"""The sm_90 forward convolution (csrc/kernels/conv_sm90.cuh: wgmma from 128-byte swizzled shared
memory, the weight by 2-D tensor copies completing on mbarriers, the activations by cp.async)
through backend="simt" with PACKED_KERNELS_SIMT_ARCH=90, which selects it in the emulator as an
sm_90 device does on a GPU. Shapes with channels per group a multiple of 8 (the path's
condition): several row and column tiles, 128 x 64 and 64 x 128 tiles, K tails, more K
slices than stages, padding taps, strides, dilation, groups; the epilogue and channel statistics
run on it too (an input prologue falls back to the mma.sync kernel), and so does the stride-1
input gradient."""

import pytest
import torch

from conv_cases import check_fused_matches_fp64
from test_conv_cuda import _check_conv, _ids

# name: (batch, c_in, c_out, (h, w), kernel, stride, padding, dilation, groups)
SM90_CASES = {
    "grouped_3x3_k_tail": (2, 32, 48, (9, 7), 3, 1, 1, 1, 2),         # 24 channels: a 128 x 64 tile
    "wide_1x1_s2_two_column_tiles": (1, 16, 256, (7, 6), 1, 2, 0, 1, 1),  # 128-channel tiles
    "deep_3x3_s2_dilated": (1, 64, 32, (11, 10), 3, 2, 2, 2, 2),     # 5 slices through 4 stages
    "rows_and_channel_tails": (2, 8, 136, (10, 9), 3, 1, 1, 1, 1),   # 3 row tiles, 136 = 128 + 8
}


@pytest.fixture(autouse=True)
def sm90(monkeypatch):
    monkeypatch.setenv("PACKED_KERNELS_SIMT_ARCH", "90")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_ids)
@pytest.mark.parametrize("name", list(SM90_CASES))
def test_sm90_forward_matches_fp64(name, dtype):
    _check_conv("simt", name, dtype, "channels_last", SM90_CASES[name])


@pytest.mark.parametrize("options", ["epilogue", "stats"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_ids)
def test_sm90_forward_fused_matches_fp64(options, dtype):
    check_fused_matches_fp64("simt", options, dtype, "channels_last", SM90_CASES["deep_3x3_s2_dilated"])


@pytest.mark.parametrize("name", ["grouped_3x3_k_tail", "rows_and_channel_tails"])
def test_sm90_forward_statistics_per_64_row_tile(name):
    # 128 x 64 tiles write the statistics of two 64-row tiles (126 rows: 64 + 62), 64 x 128 tiles
    # of one; both merge as the mma.sync kernel's do.
    check_fused_matches_fp64("simt", "stats", torch.float16, "channels_last", SM90_CASES[name])


# At stride 1 the input gradient runs as the forward of grad with the reversed, channel-swapped
# weight (conv.cuh's input_grad_as_forward) where grad's channels per group are a multiple of 8;
# else, where the padding exceeds the taps' reach, and in fp32, on the mma.sync kernel
# (tests/test_simt_hopper.py checks which kernel runs).
INPUT_GRAD_CASES = {
    "1x1_expanding": (2, 16, 64, (5, 6), 1, 1, 0, 1, 2),
    "3x3_dilated": (1, 16, 32, (9, 8), 3, 1, 1, 2, 2),               # padding 1 of a reach of 4
    "even_kernel_same_padding": (1, 16, 16, (6, 7), (2, 4), 1, "same", 1, 2),  # uneven sides
    "padding_past_the_taps": (1, 16, 16, (5, 5), 3, 1, 3, 1, 1),     # mma.sync kernel
    "grad_groups_of_6_channels": (1, 16, 12, (6, 6), 3, 1, 1, 1, 2),  # mma.sync kernel
}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=_ids)
@pytest.mark.parametrize("name", list(INPUT_GRAD_CASES))
def test_sm90_stride_1_input_grad_matches_fp64(name, dtype):
    _check_conv("simt", name, dtype, "channels_last", INPUT_GRAD_CASES[name])


def test_sm90_forward_nchw_input_matches_fp64():
    # NCHW goes through the layout transform to the same kernel.
    _check_conv("simt", "rows_and_channel_tails", torch.float16, "nchw", SM90_CASES["rows_and_channel_tails"])
