# SPDX-License-Identifier: Apache-2.0
"""Tile configs for the grouped-conv kernels: a heuristic default, and autotuning per
(kernel, shape class, dtype, layout, GPU) with an on-disk cache.

Every config the heuristic or the autotuner can pick comes from `candidates()`, which is also
what the compile-for-target check compiles, so nothing reaches a GPU uncompiled-checked.

Switches:
  PACKED_KERNELS_AUTOTUNE=0     never benchmark configs, use the heuristic (tests set this);
                                autotuning only ever runs on CUDA tensors, never under the
                                interpreter, whatever this says, nor during a CUDA-graph
                                capture (a shape first seen there gets the heuristic, uncached)
  PACKED_KERNELS_CACHE_DIR=dir  where conv_tuning.json lives, beside the engine choices
                                (packed_kernels.dispatch; default ~/.cache/packed_kernels)
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from .. import _backend, _config
from ..dispatch import JsonCache

SHARED_MEMORY_BUDGET = 96 * 1024  # bytes: under sm_86/sm_89's 99 KiB per block, so one list fits all


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Forward and input-grad GEMMs: rows = pixels (many), cols = channels of a group, K = channels
# of a group per tap. Input-grad uses the same list with the roles of C_in and C_out swapped.
# Two stages: the masked gathers of an implicit GEMM keep their addresses and masks live per
# stage, and a third stage spills the larger tiles (checked by the compile-for-target test).
_PIXEL_ROW_CONFIGS = (
    TileConfig(64, 16, 16, 4, 2),
    TileConfig(64, 32, 32, 4, 2),
    TileConfig(128, 64, 32, 8, 2),
    TileConfig(128, 128, 32, 8, 2),
)
# The input-grad kernel's smallest tile runs unpipelined: with 2 stages ptxas spills it (fp32
# on sm_80 with 4 warps, fp16 on sm_90 with 2), checked by the compile-for-target test.
_INPUT_GRAD_CONFIGS = (TileConfig(64, 16, 16, 4, 1),) + _PIXEL_ROW_CONFIGS[1:]
# Weight-grad GEMM: rows = C_out of a group, cols = C_in of a group, K = output pixels (many,
# so the K tile is as wide as shared memory allows: 64 for 16-bit types, 32 for fp32).
_CHANNEL_TILES = (16, 32, 64, 128)
_WEIGHT_GRAD_TILES = ((16, 16), (32, 32), (64, 64), (128, 64), (128, 128))
# Without 16-byte alignment (e.g. 3 channels per group) every element is loaded on its own,
# with its own address register: only small tiles fit the registers. 64x64 for wider 16-bit
# groups (the stem's 128 output channels read its input twice, not 8 times); 64x128 spills
# (sm_90, the fused forward), and so does 64x64 in fp32.
_UNALIGNED_CONFIGS = {
    "pixel_rows": (TileConfig(16, 16, 16, 4, 2), TileConfig(64, 64, 16, 4, 2)),
    "weight_grad": ((16, 16), (32, 32)),
}
# Weight grad with unaligned input channels but 16-byte runs of output channels (the stem:
# 3 -> 128): the gradient's rows load as vectors, so a tile over 128 output channels fits (it
# reads each input element once per tap, not once per 16 output channels); element by element
# it spills.
_VECTOR_OUT_WEIGHT_GRAD_TILES = ((128, 16),)
# Unaligned input channels but 16-byte runs of output channels (the stem, 3 <-> 128): what runs
# along the output channels loads and stores as vectors (the forward's weight rows, residual
# and output; the input gradient's K axis, grad and weight), which frees the registers for
# larger tiles (element by element the forward spills beyond 64x64). The forward: one tile over
# all 128 output channels (the input read once per tap, not twice); the input gradient: a tall
# one, N covering the few input channels. On FMAs (fp32 without TF32) they run smaller and
# unpipelined: the forward's 64x64 pipelined reaches 255 registers on sm_80, the input
# gradient's 128x16 pipelined spills there (and its 64-row and K-16 variants on sm_86-sm_90).
_VECTOR_OUT_CONFIGS = {
    ("forward", "mma"): (TileConfig(128, 128, 16, 8, 2),),
    ("forward", "fma"): (TileConfig(64, 64, 16, 4, 1),),
    ("input_grad", "mma"): (TileConfig(128, 16, 32, 4, 2),),
    ("input_grad", "fma"): (TileConfig(128, 16, 32, 4, 1),),
}

KERNELS = ("forward", "input_grad", "weight_grad")


def _shared_memory(config: TileConfig, dtype: torch.dtype) -> int:
    return config.num_stages * (config.block_m + config.block_n) * config.block_k * dtype.itemsize


def input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 only where cuDNN would use it (torch.backends.cudnn.allow_tf32)."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def candidates(kernel: str, dtype: torch.dtype, aligned: bool = True,
               precision: Optional[str] = None, vector_out: bool = False) -> List[TileConfig]:
    """Every config the launchers may use for this kernel, dtype and dot precision (default:
    what input_precision gives now), kept short: each one is compiled for four targets by the
    compile-for-target check. Unaligned channel runs load element by element, one address
    register each: only small tiles fit the registers. vector_out: the output channels (the
    gradient's runs) are 16-byte runs where the input channels are not."""
    precision = precision or input_precision(dtype)
    fma = dtype == torch.float32 and precision == "ieee"  # tl.dot on FMAs, no tensor cores
    if kernel == "weight_grad":
        bk = 64 if dtype.itemsize == 2 else 32
        tiles = _WEIGHT_GRAD_TILES if aligned else (
            _UNALIGNED_CONFIGS["weight_grad"] + (_VECTOR_OUT_WEIGHT_GRAD_TILES if vector_out else ()))
        if fma:  # operands and accumulator in registers: 64x64 and up spill (sm_80-sm_89)
            tiles = [t for t in tiles if t[0] * t[1] <= 32 * 32]
        pool = [TileConfig(bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 2) for bm, bn in tiles]
    else:
        rows_pool = _INPUT_GRAD_CONFIGS if kernel == "input_grad" else _PIXEL_ROW_CONFIGS
        pool = rows_pool if aligned else _UNALIGNED_CONFIGS["pixel_rows"]
        if not aligned and vector_out:
            pool = _VECTOR_OUT_CONFIGS[kernel, "fma" if fma else "mma"]
        elif dtype == torch.float32:
            # Spills in fp32 (measured by the compile-for-target check): the input gradient's
            # 128x64 (sm_80), 64x32 pipelined (sm_86/sm_89), and on FMAs the forward's 128x64
            # and 128x128. The TF32 forward keeps both, 8 warps, 2 stages (122-152 and 161-255
            # registers, no spills on sm_80-sm_90, fused or not): its 64-128 channel groups
            # then read each input tile once, not 2-4 times.
            dropped = set() if kernel == "forward" and not fma else {(128, 64)}
            if kernel == "forward" and fma:
                dropped |= {(128, 128)}
            if fma and kernel == "input_grad":  # spill on FMAs: 128x128 (all), 64x16 (sm_80)
                dropped |= {(128, 128), (64, 16)}
            if not aligned:  # the unaligned 64x64 spills in fp32 (sm_90: fused forward, FMAs)
                dropped |= {(64, 64)}
            pool = [c._replace(num_stages=1) if (c.block_m, c.block_n) == (64, 32) else c
                    for c in pool if (c.block_m, c.block_n) not in dropped]
    return [c for c in pool if _shared_memory(c, dtype) <= SHARED_MEMORY_BUDGET]


def _fit(size: int, tiles) -> int:
    """Smallest tile covering `size`, else the largest tile."""
    for tile in tiles:
        if size <= tile:
            return tile
    return tiles[-1]


def heuristic(kernel: str, dtype: torch.dtype, rows: int, cols: int, depth: int,
              aligned: bool = True, vector_out: bool = False) -> TileConfig:
    """A sound default without timing. Forward/input-grad: the column tile covers the group's
    channels (no wasted MMA columns for narrow groups, up to 128) and the K tile the channels
    per tap. Weight-grad: the channel tile pair with the least padded MMA work."""
    pool = candidates(kernel, dtype, aligned, vector_out=vector_out)
    if kernel == "weight_grad":  # rows/cols are channel counts, depth = pixels
        def padded_work(c):  # MMA work including the tile padding; ties go to larger tiles
            return (triton.cdiv(rows, c.block_m) * c.block_m * triton.cdiv(cols, c.block_n)
                    * c.block_n, -c.block_m * c.block_n)
        return min(pool, key=padded_work)
    bn = _fit(cols, _CHANNEL_TILES)
    bk = 16 if depth <= 16 else 32
    # Nearest listed tile: columns first (wasted MMA columns cost the most), then K.
    return min(pool, key=lambda c: (c.block_n < min(cols, 128), abs(c.block_n - bn),
                                    c.block_k > max(bk, 16), abs(c.block_k - bk)))


TUNING_CACHE = JsonCache("conv_tuning")  # beside the engine choices (PACKED_KERNELS_CACHE_DIR)


def shape_class(kernel: str, dtype: torch.dtype, layout: str, device: torch.device,
                rows: int, cols: int, depth: int) -> str:
    """Cache key. Channel counts are exact (few distinct values in a network); pixel counts
    are bucketed to powers of two so batch and map size share a tuning; fp32's dot precision
    (TF32 or ieee) picks from its own candidates."""
    gpu = _backend.device_name(device)
    if kernel == "weight_grad":
        rows_key, depth_key = rows, triton.next_power_of_2(depth)
    else:
        rows_key, depth_key = triton.next_power_of_2(rows), depth
    return (f"{kernel}|{gpu}|{str(dtype).replace('torch.', '')}|{input_precision(dtype)}|{layout}|"
            f"rows={rows_key}|cols={cols}|depth={depth_key}|triton={triton.__version__}")


def layout_of(t: torch.Tensor) -> str:
    if t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "nchw" if t.is_contiguous() else "strided"


def pick(kernel: str, activation: torch.Tensor, rows: int, cols: int, depth: int, aligned: bool,
         launch: Callable[[TileConfig], object], vector_out: bool = False) -> TileConfig:
    """The tile config for one launch: cached or freshly tuned on a GPU, else the heuristic.
    `launch(config)` runs the kernel once with that config (its outputs get overwritten)."""
    default = heuristic(kernel, activation.dtype, rows, cols, depth, aligned, vector_out)
    if activation.device.type != "cuda" or not _config.autotune():
        return default
    key = shape_class(kernel, activation.dtype, layout_of(activation), activation.device,
                      rows, cols, depth) + f"|aligned={aligned}" + ("|vector_out" if vector_out else "")
    cached = TUNING_CACHE.get(key)
    if cached is not None:
        return TileConfig(*cached)
    if torch.cuda.is_current_stream_capturing():
        return default  # benchmarking synchronises, which a CUDA-graph capture forbids
    best, best_ms = default, float("inf")
    for config in candidates(kernel, activation.dtype, aligned, vector_out=vector_out):
        try:
            ms = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)
        except OutOfResources:  # a config this GPU cannot run (shared memory): skip it
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    TUNING_CACHE.put(key, list(best))
    return best
