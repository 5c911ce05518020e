# SPDX-License-Identifier: Apache-2.0
"""Merging per-tile channel statistics into mean and (biased) variance.

A kernel that reduces a tile of rows writes, per channel, the tile's sum and its M2 (sum of
squared deviations from the tile's own mean). Summing raw sums of squares instead cancels
catastrophically in fp32 when |mean| >> std (E[y^2] - mean^2 of two numbers ~mean^2); Chan et
al.'s merge keeps every term a deviation:
    mean = sum_t s_t / n,   M2 = sum_t M2_t + sum_t c_t (s_t / c_t - mean)^2,   var = M2 / n.
The merge runs in a fixed order (deterministic: no atomics anywhere): one Triton launch on a
GPU (triton/tile_stats.py), torch on the (tiles, C) partials elsewhere, in their dtype."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _backend


def tile_row_counts(rows: int, rows_per_tile: int, tiles: int, like: Tensor) -> Tensor:
    """(tiles, 1) valid-row counts: rows_per_tile each, the last tile what remains."""
    starts = torch.arange(tiles, device=like.device, dtype=torch.int64) * rows_per_tile
    counts = (rows - starts).clamp(max=rows_per_tile)
    return counts.to(like.dtype).unsqueeze(1)


def merge_tile_moments(sums: Tensor, m2s: Tensor, rows: int, rows_per_tile: int) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) per channel from (tiles, C) per-tile sums and M2s over `rows` rows
    split into tiles of `rows_per_tile` (the last one partial): one Triton launch for fp32
    partials on a GPU, else the torch reference."""
    if (sums.is_cuda and sums.dtype == torch.float32 and sums.stride(1) == 1 and m2s.stride(1) == 1
            and _backend.unavailable_reason("triton", sums.device, sums.dtype) is None):
        from .triton import tile_stats
        return tile_stats.merge_tile_moments(sums, m2s, rows, rows_per_tile)
    return reference_merge_tile_moments(sums, m2s, rows, rows_per_tile)


def reference_merge_tile_moments(sums: Tensor, m2s: Tensor, rows: int,
                                 rows_per_tile: int) -> Tuple[Tensor, Tensor]:
    counts = tile_row_counts(rows, rows_per_tile, sums.shape[0], sums)
    mean = sums.sum(0) / rows
    deviation = sums / counts - mean
    m2 = m2s.sum(0) + (counts * deviation * deviation).sum(0)
    return mean, m2 / rows
