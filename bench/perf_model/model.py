# SPDX-License-Identifier: Apache-2.0
"""The modelled time of one kernel launch, from its SASS, and its fraction of the roofline.

modelled = max(issue, tensor, dram, l2), each over the launch's waves:
  issue   warp instructions of a block (main-loop nest: instructions per pass x trips, the rest of
          the kernel once) x resident blocks / (min(4, resident warps) per clock)  per wave
  tensor  the block's tensor-core flops / the SM's rate for that instruction (wgmma's on Hopper,
          HMMA (mma.sync) at a share of it)  per wave
  dram    compulsory bytes (+ fp32 split partials written and read back) / HBM bandwidth; a
          batch-norm or ensemble launch: the bytes it moves as written (streams.py)
  l2      the operand tiles every block reads per K step ((rows + cols) x depth elements) / L2
          bandwidth (the SASS's load widths per pass would count a pipeline's predicated-off
          prefetches too)
A wave is as many blocks as the SMs hold at the occupancy that registers, shared memory and
threads allow. No latencies, no launch overhead, no bank conflicts: an optimistic bound, which is
why it is read as "modelled", never as a prediction of measured time. A torch glue pass (no
cubin) is its bytes at HBM bandwidth.
roofline = max(useful flops / dense tensor peak, compulsory bytes / HBM bandwidth);
fraction = roofline / modelled (1 = the kernel's code could reach the card's roofline).
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from . import sass
from .gpus import GPU
from .kernels import DTYPES, Launch

_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@functools.lru_cache(maxsize=None)
def _cubin(path: Path):
    """(kernel name -> instructions, kernel name -> resource usage) of one cubin."""
    code = sass.disassemble(path)
    text = subprocess.run([str(sass.TOOLS / "cuobjdump"), "-res-usage", str(path)],
                          capture_output=True, text=True, check=True).stdout
    usage = {m.group(1): {"registers": int(m.group(2)), "stack": int(m.group(3)),
                          "static_shared": int(m.group(4)), "local": int(m.group(5))}
             for m in _RES.finditer(text)}
    return code, usage


def kernel_code(launch: Launch) -> Tuple[sass.KernelCode, Dict[str, int]]:
    code, usage = _cubin(launch.cubin)
    names = [n for n in code if n.startswith(launch.kernel)]
    if len(names) != 1:
        raise RuntimeError(f"{launch.cubin.name}: {len(names)} kernels named {launch.kernel}*")
    return _analysed(launch.cubin, names[0], launch.main_loop), usage[names[0]]


@functools.lru_cache(maxsize=None)
def _analysed(path: Path, name: str, priority) -> sass.KernelCode:
    return sass.analyse(name, _cubin(path)[0][name], priority)


_HMMA_SHAPE = re.compile(r"\.(\d{2})(\d)(\d{1,2})\b")       # HMMA.16816 -> 16, 8, 16
_HGMMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)\b")         # HGMMA.64x128x16


def tensor_flops_per_warp(opcode: str) -> float:
    """Flops one warp's issue of a tensor-core instruction stands for (a warpgroup instruction
    is issued by each of its 4 warps)."""
    if opcode.startswith("HGMMA"):
        m, n, k = map(int, _HGMMA_SHAPE.search(opcode).groups())
        return 2 * m * n * k / 4
    found = _HMMA_SHAPE.search(opcode)
    m, n, k = map(int, found.groups()) if found else (16, 8, 16)
    return 2 * m * n * k


@dataclass
class Modelled:
    registers: int
    shared_bytes: int
    spill_instructions: int
    blocks_per_sm: int
    waves: int
    per_iteration: Dict[str, int]    # main loop's instruction mix, one pass (category -> count)
    main_loop_instructions: int
    main_loop_tensor: int
    generic_shared_suspects: int     # generic LD/ST in the main loop (shared tiles not seen as shared)
    times: Dict[str, float] = field(default_factory=dict)  # seconds: issue, tensor, dram, l2

    @property
    def seconds(self) -> float:
        return max(self.times.values())

    @property
    def bound(self) -> str:
        return max(self.times, key=self.times.get)


def occupancy(gpu: GPU, registers: int, shared_bytes: int, warps: int) -> int:
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocated per warp in 256s
    by_registers = (gpu.registers_per_sm // regs_per_warp) // warps
    by_shared = gpu.max_shared_per_sm // (shared_bytes + 1024) if shared_bytes else gpu.max_blocks_per_sm
    by_threads = gpu.max_threads_per_sm // (32 * warps)
    return max(0, min(by_registers, by_shared, by_threads, gpu.max_blocks_per_sm))


def model_launch(launch: Launch, gpu: GPU, compulsory_bytes: int) -> Modelled:
    if launch.cubin is None:  # a torch glue pass (a sum, a copy): its bytes at HBM bandwidth
        return Modelled(0, 0, 0, 0, 0, {}, 0, 0, 0,
                        {"dram": (compulsory_bytes + launch.extra_dram_bytes) / (gpu.hbm_gbps * 1e9)})
    code, usage = kernel_code(launch)
    shared = usage["static_shared"] + launch.dynamic_shared
    occ = occupancy(gpu, usage["registers"], shared, launch.num_warps)
    if occ == 0:
        raise RuntimeError(f"{launch.kernel}: does not fit an SM of {gpu.name}")
    levels = code.nest_mix()
    trips = list(launch.trips)
    if len(levels) < len(trips):  # the compiler merged or unrolled outer loops: fold them inwards
        trips = [math.prod(trips[len(levels) - 1:]) if i == len(levels) - 1 else t
                 for i, t in enumerate(trips[:len(levels)])]
    trips += [1] * (len(levels) - len(trips))  # deeper nests than expected: extra levels run once
    runs = [math.prod(trips[i:]) for i in range(len(levels))]
    outside = code.outside_mix()
    instructions = outside.instructions + sum(m.instructions * r for m, r in zip(levels, runs))
    tensor_flops = 0.0
    fma_flops = 0.0
    for m, r in zip([outside, *levels], [1, *runs]):
        for opcode, count in m.opcodes.items():
            kind = sass.category(opcode)
            if kind == "tensor":  # TF32 runs at half the 16-bit rate: its flops count twice
                tensor_flops += tensor_flops_per_warp(opcode) * count * r * (2 if ".TF32" in opcode else 1)
            elif opcode.startswith("FFMA"):
                fma_flops += 64 * count * r
    warps = launch.num_warps
    blocks = launch.active_blocks
    resident = min(occ, math.ceil(blocks / gpu.sms))
    waves = math.ceil(blocks / (gpu.sms * resident))
    clock = gpu.clock_ghz * 1e9
    uses_hgmma = any(op.startswith("HGMMA") for m in levels for op in m.opcodes)
    mma_rate = gpu.mma_flops_per_clock_sm * (1.0 if uses_hgmma else gpu.mma_sync_share)
    per_wave = resident * warps
    times = {
        "issue": waves * per_wave * instructions / (min(gpu.issue_per_clock_sm, per_wave) * clock),
        "tensor": waves * per_wave * (tensor_flops / (mma_rate * clock)
                                      + fma_flops / (gpu.fp32_flops_per_clock_sm * clock)),
        "dram": (compulsory_bytes + launch.extra_dram_bytes) / (gpu.hbm_gbps * 1e9),
        "l2": launch.operand_bytes / (gpu.l2_gbps * 1e9),
    }
    main = levels[0] if levels else outside
    spills = code.total_mix().counts.get("local", 0)
    generic = main.counts.get("generic_ld", 0) + main.counts.get("generic_st", 0)
    return Modelled(usage["registers"], shared, spills, occ, waves, dict(main.counts),
                    main.instructions, main.counts.get("tensor", 0), generic, times)


def compulsory_bytes(layer, pass_name: str, batch: int, dtype_name: str) -> int:
    """Each operand read once and the result written once."""
    itemsize = DTYPES[dtype_name].itemsize
    oh, ow = layer.out_hw()
    x = batch * layer.c_in * layer.h * layer.w
    y = batch * layer.c_out * oh * ow
    w = layer.c_out * (layer.c_in // layer.groups) * layer.kernel[0] * layer.kernel[1]
    return itemsize * (x + y + w)  # forward: x, w -> y; input grad: g, w -> gx; weight grad: g, x -> gw


def roofline_seconds(layer, pass_name: str, batch: int, dtype_name: str, gpu: GPU) -> float:
    flops = layer.flops(batch)
    peak = gpu.tensor_tflops * 1e12
    if dtype_name == "fp32":  # TF32 tensor cores (Triton) at half the 16-bit rate
        peak /= 2
    return max(flops / peak, compulsory_bytes(layer, pass_name, batch, dtype_name) / (gpu.hbm_gbps * 1e9))
