# SPDX-License-Identifier: Apache-2.0
"""The GPUs the performance model knows: counts and rates, each with where it comes from.

Tensor-core rates are dense (no sparsity), 16-bit inputs with fp32 accumulation (what the conv
kernels run), per SM per clock, so that SMs x rate x clock gives the datasheet's TFLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    arch: int                    # compute capability as the compiler's target (90 = sm_90)
    sms: int
    clock_ghz: float             # the clock the datasheet's tensor TFLOP/s is quoted at
    hbm_gbps: float              # DRAM bandwidth, GB/s
    l2_bytes_per_clock: int      # L2 -> SM read bandwidth for the whole chip
    mma_flops_per_clock_sm: int  # dense fp16/bf16 -> fp32, the fastest tensor-core instruction
    mma_sync_share: float        # fraction of that rate mma.sync (HMMA) reaches
    fp32_flops_per_clock_sm: int  # FFMA: 2 x fp32 lanes
    max_shared_per_sm: int       # bytes usable by blocks
    max_threads_per_sm: int
    max_blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    issue_per_clock_sm: int = 4  # four schedulers, one warp instruction each per clock
    sources: str = ""

    @property
    def tensor_tflops(self) -> float:
        return self.sms * self.mma_flops_per_clock_sm * self.clock_ghz / 1e3

    @property
    def l2_gbps(self) -> float:
        return self.l2_bytes_per_clock * self.clock_ghz


GPUS: Dict[str, GPU] = {
    "h100": GPU(
        "h100", "H100 SXM5", 90, sms=132, clock_ghz=1.83, hbm_gbps=3350,
        l2_bytes_per_clock=5120, mma_flops_per_clock_sm=4096, mma_sync_share=0.6,
        fp32_flops_per_clock_sm=256, max_shared_per_sm=228 * 1024, max_threads_per_sm=2048,
        sources=(
            "132 SMs, 989.4 dense fp16 TFLOP/s (= 132 x 4096 flop/clk x 1.83 GHz), 3.35 TB/s "
            "HBM3: NVIDIA H100 Tensor Core GPU datasheet and the NVIDIA H100 (Hopper) "
            "architecture whitepaper; 228 KB shared memory per SM, 2048 threads per SM: "
            "CUDA C++ Programming Guide, compute capability 9.0. mma.sync share ~0.6 of wgmma: "
            "ASSUMED (project DESIGN note; microbenchmarks of Hopper, e.g. Luo et al. "
            "arXiv:2402.13499, find legacy mma.sync well below wgmma) - not measured here. "
            "L2 5120 B/clk: ASSUMED equal to A100's whitepaper figure (no H100 figure published).")),
    "h200": GPU(
        "h200", "H200 SXM", 90, sms=132, clock_ghz=1.83, hbm_gbps=4800,
        l2_bytes_per_clock=5120, mma_flops_per_clock_sm=4096, mma_sync_share=0.6,
        fp32_flops_per_clock_sm=256, max_shared_per_sm=228 * 1024, max_threads_per_sm=2048,
        sources=(
            "GH100 like the H100 SXM: 132 SMs, 989 dense fp16 TFLOP/s (NVIDIA H200 datasheet: "
            "1,979 with sparsity), 4.8 TB/s HBM3e (same datasheet). This project measured on an "
            "H200: 4264 GB/s device copy, 759 TFLOP/s fp16 cuBLAS matmul "
            "(bench/results/2026-12-04-nvidia-h200-quick). mma.sync share and L2: as h100.")),
    "a100": GPU(
        "a100", "A100 SXM4 80GB", 80, sms=108, clock_ghz=1.41, hbm_gbps=2039,
        l2_bytes_per_clock=5120, mma_flops_per_clock_sm=2048, mma_sync_share=1.0,
        fp32_flops_per_clock_sm=128, max_shared_per_sm=164 * 1024, max_threads_per_sm=2048,
        sources=(
            "108 SMs, 1410 MHz boost, 312 dense fp16 TFLOP/s (= 108 x 2048 x 1.41 GHz), L2 read "
            "bandwidth 5120 B/clk: NVIDIA A100 Tensor Core GPU architecture whitepaper; "
            "2.039 TB/s (80 GB SXM; 1.555 TB/s for 40 GB): A100 datasheet; 164 KB shared per SM: "
            "CUDA C++ Programming Guide, compute capability 8.0. mma.sync is Ampere's "
            "tensor-core instruction (share 1).")),
    "rtx3090": GPU(
        "rtx3090", "GeForce RTX 3090", 86, sms=82, clock_ghz=1.695, hbm_gbps=936,
        l2_bytes_per_clock=2048, mma_flops_per_clock_sm=512, mma_sync_share=1.0,
        fp32_flops_per_clock_sm=256, max_shared_per_sm=100 * 1024, max_threads_per_sm=1536,
        sources=(
            "82 SMs, 1695 MHz boost, 71 dense fp16 TFLOP/s with fp32 accumulation "
            "(= 82 x 512 x 1.695 GHz), 936 GB/s GDDR6X: NVIDIA Ampere GA102 GPU architecture "
            "whitepaper; 100 KB shared, 1536 threads per SM: CUDA C++ Programming Guide, "
            "compute capability 8.6. L2 2048 B/clk: ASSUMED (no figure published).")),
    "rtx4090": GPU(
        "rtx4090", "GeForce RTX 4090", 89, sms=128, clock_ghz=2.52, hbm_gbps=1008,
        l2_bytes_per_clock=2048, mma_flops_per_clock_sm=512, mma_sync_share=1.0,
        fp32_flops_per_clock_sm=256, max_shared_per_sm=100 * 1024, max_threads_per_sm=1536,
        sources=(
            "128 SMs, 2520 MHz boost, 165.2 dense fp16 TFLOP/s with fp32 accumulation "
            "(= 128 x 512 x 2.52 GHz), 1008 GB/s GDDR6X: NVIDIA Ada GPU architecture whitepaper; "
            "100 KB shared, 1536 threads per SM: CUDA C++ Programming Guide, compute capability "
            "8.9. L2 2048 B/clk: ASSUMED (no figure published).")),
}
