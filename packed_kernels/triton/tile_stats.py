# SPDX-License-Identifier: Apache-2.0
"""Per-tile channel statistics merged into mean and biased variance in one launch (the formula
is _tile_stats.py's; its torch spelling takes about a dozen small launches per conv).

One program per block of channels walks the tiles twice in a fixed order: the mean first, then
the M2 terms around it (deterministic, no atomics)."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc

BLOCK_T = 32  # tiles per step
BLOCK_C = 128  # channels per program
NUM_WARPS = 4


@triton.jit
def _merge_tile_moments_kernel(sums_ptr, m2s_ptr, out_ptr, tiles, C, rows, rows_per_tile,
                               stride_sums, stride_m2s,
                               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    total = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < tiles)[:, None] & valid_c[None, :]
        total += tl.sum(tl.load(sums_ptr + offs_t[:, None] * stride_sums + offs_c[None, :],
                                mask=mask, other=0.0), axis=0)
    mean = total / rows
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid_t = offs_t < tiles
        mask = valid_t[:, None] & valid_c[None, :]
        s = tl.load(sums_ptr + offs_t[:, None] * stride_sums + offs_c[None, :], mask=mask, other=0.0)
        q = tl.load(m2s_ptr + offs_t[:, None] * stride_m2s + offs_c[None, :], mask=mask, other=0.0)
        # rows in each tile: rows_per_tile, the last one what remains
        counts = tl.where(valid_t, tl.minimum(rows - offs_t * rows_per_tile, rows_per_tile), 1)
        counts = counts.to(tl.float32)[:, None]
        deviation = s / counts - mean[None, :]
        m2 += tl.sum(tl.where(mask, q + counts * deviation * deviation, 0.0), axis=0)
    tl.store(out_ptr + offs_c, mean, mask=valid_c)
    tl.store(out_ptr + C + offs_c, m2 / rows, mask=valid_c)


def merge_tile_moments(sums: torch.Tensor, m2s: torch.Tensor, rows: int,
                       rows_per_tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var), fp32, from (tiles, C) fp32 per-tile sums and M2s whose channel
    stride is 1; the two results are the rows of one (2, C) tensor. Called inside the conv ops,
    which make the input's GPU current."""
    tiles, channels = sums.shape
    out = _alloc.empty((2, channels), sums, dtype=torch.float32)
    _merge_tile_moments_kernel[(triton.cdiv(channels, BLOCK_C),)](
        sums, m2s, out, tiles, channels, rows, rows_per_tile, sums.stride(0), m2s.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return out[0], out[1]


def compile_cases():
    from .compile_case import CompileCase, kernel_signature

    signature = kernel_signature(_merge_tile_moments_kernel, lambda name: "*fp32")
    return [CompileCase(f"tile_stats.merge_tile_moments[BLOCK_T={BLOCK_T},BLOCK_C={BLOCK_C}]",
                        _merge_tile_moments_kernel, signature,
                        dict(BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C), NUM_WARPS)]
