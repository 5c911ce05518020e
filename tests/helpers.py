# SPDX-License-Identifier: Apache-2.0
"""Accuracy judgement shared by the tests.

Reference: the torch op in float64 on the CPU. A low-precision result passes when its error
is at most twice torch's own error at that precision on the same inputs, plus a small floor
(for results so accurate that torch's error is at rounding level)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

# Relative-error floors: a few units of rounding in each dtype (float32 eps 1.2e-7,
# float16 9.8e-4, bfloat16 7.8e-3), for sums of up to thousands of terms.
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all() == torch.isfinite(ref).all(), "non-finite values differ"
    scale = ref.norm()
    return float((out - ref).norm() / scale) if scale > 0 else float((out - ref).norm())


def assert_close(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, dtype: torch.dtype,
                 what: str = "") -> None:
    """`out` (ours) and `torch_out` (torch at `dtype`) against the float64 `ref`."""
    ours = relative_error(out, ref)
    theirs = relative_error(torch_out, ref)
    bound = 2 * theirs + FLOOR[dtype]
    assert ours <= bound, f"{what}: relative error {ours:.3e} > 2 x torch's {theirs:.3e} + floor"


def assert_all_finite(*tensors: torch.Tensor) -> None:
    """Outputs are poisoned with NaN before launch: a NaN left means an unwritten element."""
    for t in tensors:
        assert torch.isfinite(t).all(), "output has NaN/inf: some element was not written"


TARGET_ARCHS = (80, 86, 89, 90)  # tools/build_config.py's DEFAULT_ARCHS: what the build ships

_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_USAGE = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_verbose(text: str) -> list:
    """Resource usage per kernel from `ptxas -v` (also nvcc -Xptxas -v) output:
    dicts with name, arch, registers, stack, spill_stores, spill_loads, smem."""
    kernels = []
    for line in text.splitlines():
        found = _FUNCTION.search(line)
        if found:
            kernels.append({"name": found.group(1), "arch": found.group(2), "registers": 0,
                            "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0})
            continue
        if not kernels:
            continue
        current = kernels[-1]
        if (found := _SPILLS.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, found.groups())
        if (found := _USAGE.search(line)):
            current["registers"] = int(found.group(1))
        if (found := _SMEM.search(line)):
            current["smem"] = int(found.group(1))
    return kernels


CSRC = Path(__file__).resolve().parents[1] / "csrc"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def build_sanitized_selftest(source: Path, binary: Path, required: bool) -> Path:
    """Compiles a csrc/tests self-test against the SIMT emulator with ASan + UBSan. Without a C++
    compiler: fails when the simt backend is required (CI), else skips."""
    import pytest

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        message = f"no C++ compiler (g++) to build {source.name}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    command = [compiler, "-std=c++17", "-O1", "-g", "-DPK_SIMT=1", *SANITIZE, f"-I{CSRC / 'include'}",
               f"-I{CSRC / 'kernels'}", f"-I{CSRC / 'tests'}", str(source),
               str(CSRC / "simt" / "runtime.cpp"), "-o", str(binary)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"building the sanitized {source.name} failed:\n{built.stderr[-4000:]}"
    return binary


def run_sanitized(binary: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=600, env=env)
