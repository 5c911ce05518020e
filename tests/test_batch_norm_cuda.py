# SPDX-License-Identifier: Apache-2.0
"""The CUDA C++ batch norm (csrc/kernels/batch_norm.cuh) through backend="simt" (the same source
on the SIMT emulator) and, on a GPU, backend="cuda": against torch in float64 (tests/helpers.py),
every dtype, NCHW and channels_last, training and eval, forward and backward. Shapes stay at a
few hundred elements: the emulator runs every thread."""

import pytest
import torch

import packed_kernels as pk
from packed_kernels import _backend
from packed_kernels.ops import batch_norm as bn_ops

from batch_norm_cases import check_against_float64, randn
from conftest import require_backend

BACKENDS = ["simt", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# name -> (shape, memory format): odd sizes; > 256 values per channel (several per thread) in nchw
LAYOUTS = {
    "nchw": ((3, 5, 11, 9), torch.contiguous_format),
    "channels_last": ((2, 6, 3, 5), torch.channels_last),
    "2d": ((9, 7), torch.contiguous_format),
    "channels_last_3d": ((2, 3, 2, 3, 2), torch.channels_last_3d),
    "batch1_1x1": ((1, 4, 1, 1), torch.channels_last),  # eval only: one value per channel
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine, residual, relu", [(True, True, True), (False, False, False)])
def test_forward_backward_against_float64(backend, dtype, layout, training, affine, residual, relu):
    shape, memory_format = LAYOUTS[layout]
    if training and shape[0] * torch.Size(shape[2:]).numel() == 1:
        pytest.skip("one value per channel: training raises (tested below)")
    device = require_backend(backend, dtype)
    _check_against_float64(backend, dtype, device, shape, memory_format, training, affine, residual, relu)


def _misaligned(t, offset):
    """t's values in t's layout, starting `offset` elements past an aligned address."""
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buffer[offset:].as_strided(t.shape, t.stride())
    view.copy_(t)
    return view


def _check_against_float64(backend, dtype, device, shape, memory_format, training, affine, residual, relu,
                           misaligned=0):
    x = randn(shape, dtype, device, 0.5, 2.0).contiguous(memory_format=memory_format)
    if misaligned:
        x = _misaligned(x, misaligned)
        assert x.data_ptr() % 16 != 0 and x.is_contiguous(memory_format=memory_format)
    check_against_float64(backend, x, memory_format, training, affine, residual, relu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_before_launch(backend):
    device = require_backend(backend)
    with pytest.raises(ValueError, match="more than 1 value"):
        pk.batch_norm(torch.randn(1, 3, 1, 1, device=device), None, None, training=True, backend=backend)
    with pytest.raises(ValueError, match="weight must have shape"):
        pk.batch_norm(torch.randn(4, 3, device=device), None, None, torch.ones(2, device=device), training=True,
                      backend=backend)


def test_kernels_reject_bad_buffers():
    """The extension's own checks (the last line before a launch)."""
    require_backend("simt")
    ext = _backend.extension("_simt")
    x = torch.randn(4, 3, 2, 2)
    stats = [torch.empty(3) for _ in range(3)]
    workspace = torch.empty(ext.batch_norm_workspace_floats(x))
    with pytest.raises(RuntimeError, match="out must be in the input's memory format"):
        ext.batch_norm_forward(x, None, None, None, None, None, True, 1e-5, False,
                               torch.empty_like(x, memory_format=torch.channels_last), *stats, workspace)
    with pytest.raises(RuntimeError, match="float32"):
        ext.batch_norm_forward(x, None, None, None, torch.ones(3, dtype=torch.float16), None, True, 1e-5, False,
                               torch.empty_like(x), *stats, workspace)
    with pytest.raises(RuntimeError, match="more than 1 value"):
        x1 = torch.randn(1, 3)
        ext.batch_norm_forward(x1, None, None, None, None, None, True, 1e-5, False, torch.empty_like(x1), *stats,
                               workspace)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        x64 = x.double()
        ext.batch_norm_forward(x64, None, None, None, None, None, True, 1e-5, False, torch.empty_like(x64), *stats,
                               workspace)
    with pytest.raises(RuntimeError, match="workspace"):
        ext.batch_norm_forward(x, None, None, None, None, None, True, 1e-5, False, torch.empty_like(x), *stats,
                               torch.empty(1))
    with pytest.raises(RuntimeError, match="workspace"):
        ext.batch_norm_backward(x, x, None, stats[0], stats[1], None, True, False, torch.empty_like(x),
                                stats[0].clone(), stats[1].clone(), None, None)


def test_simt_and_cuda_listed_as_implemented():
    assert {"cuda", "simt"} <= set(bn_ops.IMPLEMENTED)


# Shapes whose reduction spans several splits and channel blocks with partial tails (the simt
# build plans for 2 SMs: 8 reduction CTAs): (shape, memory format, dtype) -> the path it takes.
TILED = {
    # channels_last, 16-byte chunks: 2 channel blocks of 64 (the last holds 8), 3 splits of 60 rows
    "cl_vec_bf16": ((2, 72, 9, 10), torch.channels_last, torch.bfloat16),
    # channels_last, 8-byte chunks (C % 8 != 0): 1 partial channel block, 5 splits of 28 rows
    "cl_8byte_fp16": ((2, 36, 7, 10), torch.channels_last, torch.float16),
    # channels_last, odd C (scalar): 2 channel blocks of 32 (the last holds 5), 4 splits of 27 rows
    "cl_odd_c_fp32": ((3, 37, 5, 7), torch.channels_last, torch.float32),
    # (N, C) with C % 4 != 0: scalar, 2 channel blocks (the last holds 6), 4 splits of 13 rows
    "2d_scalar_fp16": ((50, 70), torch.contiguous_format, torch.float16),
    # (N, C), 8-byte chunks of fp32: 3 channel blocks (the last holds 6), 2 splits of 20 rows
    "2d_8byte_fp32": ((40, 70), torch.contiguous_format, torch.float32),
    # NCHW, 16-byte chunks: 576 chunks per channel in 2 splits of 288
    "nchw_vec_fp32": ((3, 3, 32, 24), torch.contiguous_format, torch.float32),
    # NCHW, 14x14 fp16: 8-byte chunks, 539 per channel in 2 splits
    "nchw_8byte_fp16": ((11, 2, 14, 14), torch.contiguous_format, torch.float16),
    # NCHW, odd H*W (scalar): 1155 values per channel in 3 splits of 385
    "nchw_odd_s_fp16": ((5, 2, 11, 21), torch.contiguous_format, torch.float16),
    # (N, C, L), fp16 16-byte chunks: 2 splits
    "ncl_vec_fp16": ((6, 2, 776), torch.contiguous_format, torch.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TILED))
@pytest.mark.parametrize("training", [True, False])
def test_split_and_channel_block_tails(backend, case, training):
    shape, memory_format, dtype = TILED[case]
    device = require_backend(backend, dtype)
    _check_against_float64(backend, dtype, device, shape, memory_format, training, True, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, memory_format", [((32, 256, 28, 28), torch.channels_last),
                                                  ((32, 128, 14, 14), torch.contiguous_format),
                                                  ((16, 2048, 7, 7), torch.channels_last),
                                                  ((16, 512, 7, 7), torch.contiguous_format)])
def test_model_sized_shapes_on_gpu(shape, memory_format):
    """The real GPU plan (hundreds of splits, one wave over the SMs) on ResNet-like shapes, fp16."""
    device = require_backend("cuda", torch.float16)
    _check_against_float64("cuda", torch.float16, device, shape, memory_format, True, True, True, True)


@pytest.mark.parametrize("shape, memory_format", [((4, 64, 3, 5), torch.channels_last),
                                                  ((3, 2, 16, 33), torch.contiguous_format)])
@pytest.mark.parametrize("offset", [1, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_input(backend, shape, memory_format, offset):
    """C (or H*W) allows 16-byte chunks but x starts 2 bytes (scalar path) or 8 bytes (8-byte
    chunks) past a 16-byte boundary."""
    device = require_backend(backend, torch.float16)
    _check_against_float64(backend, torch.float16, device, shape, memory_format, True, True, True, True,
                           misaligned=offset)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, memory_format", [((2, 40, 9, 10), torch.channels_last),
                                                  ((3, 3, 32, 24), torch.contiguous_format)])
def test_results_are_bitwise_deterministic(backend, shape, memory_format):
    """Two runs (other simt resume orders; other CTA schedules on a GPU) give the same bits:
    every merge has a fixed order."""
    device = require_backend(backend)
    x = randn(shape, torch.float32, device, 3.0, 2.0).contiguous(memory_format=memory_format)
    c = shape[1]
    w, b = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    r = randn(shape, torch.float32, device).contiguous(memory_format=memory_format)
    grad = randn(shape, torch.float32, device).contiguous(memory_format=memory_format)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        out = pk.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], True, residual=leaves[3],
                            activation="relu", backend=backend)
        runs.append([out, rm, rv, *torch.autograd.grad(out, leaves, grad)])
    for name, first, second in zip(["out", "running_mean", "running_var", "dx", "dw", "db", "dr"], *runs):
        assert torch.equal(first, second), name


@pytest.mark.parametrize("shape, memory_format", [((2, 40, 9, 10), torch.channels_last),
                                                  ((3, 3, 32, 24), torch.contiguous_format)])
@pytest.mark.parametrize("offset", [1e4, -3e5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_split_statistics_stable_for_large_means(backend, shape, memory_format, offset):
    """|mean| >> std over several splits: the partials are merged by Chan's formula, never by
    sums of squares (which lose every digit of the variance here)."""
    device = require_backend(backend)
    x = (torch.randn(shape, dtype=torch.float64) + offset).float().contiguous(memory_format=memory_format)
    c = shape[1]
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    pk.batch_norm(x.to(device), rm, rv, training=True, momentum=1.0, backend=backend)
    dims = [d for d in range(x.dim()) if d != 1]
    var64 = x.double().var(dims)
    # 1e-6: a few float32 roundings of the centred sums, as test_batch_norm's single-split case
    assert ((rv.cpu().double() - var64).abs() / var64).max() < 1e-6
    assert ((rm.cpu().double() - x.double().mean(dims)).abs()).max() < 4e-7 * abs(offset)
