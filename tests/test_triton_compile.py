# SPDX-License-Identifier: Apache-2.0
"""Compile-for-target check of every Triton kernel configuration, without a GPU.

tools/compile_triton_targets.py compiles each case of every packed_kernels.triton module's
compile_cases() for the architecture and assembles it with ptxas -v (in a separate process:
this suite runs Triton's interpreter). A register spill fails; fp16/bf16 GEMM-like kernels must
contain tensor-core instructions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import once_per_run
from helpers import TARGET_ARCHS, parse_ptxas_verbose

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Architecture -> (return code, stdout, stderr) of its compiler process; once per test run,
    however many workers run these tests."""
    return once_per_run(tmp_path_factory, "triton_compile", lambda folder: _compile())


def _compile():
    """One compiler process per architecture, all started at once (they are CPU-bound)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    processes = {arch: subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "compile_triton_targets.py"), str(arch)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for arch in TARGET_ARCHS}
    try:
        results = {}
        for arch, process in processes.items():
            stdout, stderr = process.communicate()
            results[str(arch)] = [process.returncode, stdout, stderr]
        return results
    finally:
        for process in processes.values():
            process.kill()


@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_triton_kernels_compile_without_spills(arch, compiled):
    returncode, stdout, stderr = compiled[str(arch)]
    assert returncode == 0, stderr[-4000:]
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert any(r["name"].startswith("ensemble.") for r in records)
    assert any("fp32-ieee" in r["name"] for r in records)  # fp32 without TF32: FMA dot tiles
    failures = []
    for record in records:
        if record["ptxas_returncode"] != 0:
            failures.append(f"{record['name']} sm_{arch}: ptxas failed: {record['ptxas_output'][-500:]}")
            continue
        usage = parse_ptxas_verbose(record["ptxas_output"])
        if not usage:
            failures.append(f"{record['name']} sm_{arch}: no resource usage in ptxas output")
        for kernel in usage:
            if kernel["spill_stores"] or kernel["spill_loads"]:
                failures.append(f"{record['name']} sm_{arch}: spills {kernel}")
        if record["expects_mma"] and not record["tensor_core"]:
            failures.append(f"{record['name']} sm_{arch}: no tensor-core instruction in the PTX")
    assert not failures, "\n".join(failures)


def test_ptxas_parser_reads_spills():
    text = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]"""
    (usage,) = parse_ptxas_verbose(text)
    assert usage == {"name": "k", "arch": "sm_80", "registers": 255, "stack": 8,
                     "spill_stores": 4, "spill_loads": 4, "smem": 1024}
