# SPDX-License-Identifier: Apache-2.0
"""Compile every Triton kernel configuration for one GPU architecture, without a GPU.

Usage: python tools/compile_triton_targets.py ARCH [ARCH ...]
Prints one JSON object per case: name, arch, resource usage from ptxas -v, and whether the
PTX holds tensor-core instructions. Must run without TRITON_INTERPRET (the interpreter replaces
@triton.jit functions), hence a separate process from the interpreter-based test suite."""

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter cannot compile for a GPU target")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import packed_kernels.triton as kernel_package  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TENSOR_CORE = re.compile(r"\b(mma\.sync|wgmma\.mma_async)")


def all_cases():
    cases = []
    for module_info in pkgutil.iter_modules(kernel_package.__path__):
        module = importlib.import_module(f"{kernel_package.__name__}.{module_info.name}")
        if hasattr(module, "compile_cases"):
            cases += module.compile_cases()
    return cases


def compile_case(case, arch: int, workdir: Path) -> dict:
    compiled = triton.compile(
        ASTSource(case.kernel, case.signature, constexprs=case.constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # sm_90a where Hopper-only ops are used
    ptx_file = workdir / "kernel.ptx"
    ptx_file.write_text(ptx)
    result = subprocess.run([str(PTXAS), f"-arch={target}", "-v", str(ptx_file), "-o",
                             str(workdir / "kernel.cubin")], capture_output=True, text=True)
    return {"name": case.name, "arch": arch, "ptxas_returncode": result.returncode,
            "ptxas_output": result.stdout + result.stderr,
            "tensor_core": bool(TENSOR_CORE.search(ptx)), "expects_mma": case.expects_mma}


def main(archs):
    cases = all_cases()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for case in cases:
                print(json.dumps(compile_case(case, arch, Path(tmp))), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
