# SPDX-License-Identifier: Apache-2.0
"""Compile-for-target check of the csrc CUDA kernels, without a GPU.

nvcc compiles every csrc/cuda/*.cu (every kernel instantiation the extension ships) and the
emulator's self-test kernels for sm_80/86/89/90 with -Xptxas -v; registers, spills and shared
memory are read from ptxas. A spill fails, the tensor-core tile interface must produce mma
instructions, and the pipelined conv kernels and pk/async_copy.h must produce cp.async. sm_90
builds the architecture-specific sm_90a: the sm_90 forward (conv_sm90.cuh) must produce wgmma
(HGMMA in its SASS, with no waits ptxas injects), tensor copies, mbarrier waits and proxy fences,
and the sm_90 self-test kernels (csrc/tests/hopper_selftest_kernels.cuh) must compile there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from conftest import REQUIRED, once_per_run
from helpers import TARGET_ARCHS, parse_ptxas_verbose

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import build_config  # noqa: E402
from bench.perf_model.kernels import cuda_cubin  # noqa: E402
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
SELFTEST_SOURCE = CSRC / "tests" / "selftest_kernels.cu"
HOPPER_SELFTEST_SOURCE = CSRC / "tests" / "hopper_selftest.cpp"
# Exactly as setup.py compiles them.
NVCC_FLAGS = [*build_config.NVCC_FLAGS, *build_config.TORCH_NVCC_DEFINES,
              *(f"-I{d}" for d in build_config.include_dirs(str(ROOT))), f"-I{CSRC / 'tests'}"]
MAX_THREADS = 512  # the ensemble kernels' __launch_bounds__
REGISTERS_PER_SM = 65536
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    found = str(candidate) if candidate.exists() else shutil.which("nvcc")
    if found is None:
        if "cuda" in REQUIRED:
            pytest.fail("nvcc is required here but not found (set CUDA_HOME)")
        pytest.skip("nvcc not found (set CUDA_HOME=/usr/local/cuda)")
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """ptxas reports for every source, all architectures in one nvcc run per source (in parallel),
    plus the PTX of the self-test kernels and of conv.cu for sm_80 and sm_90a, as those runs
    generated it (-keep). Once per test run, however many workers run these tests."""
    return once_per_run(tmp_path_factory, "csrc_compile", _compile)


def _compile(out: Path) -> dict:
    nvcc = _nvcc()
    gencode = build_config.cuda_arch_flags(TARGET_ARCHS)
    jobs = {}
    for source in [*KERNEL_SOURCES, SELFTEST_SOURCE]:
        keep = out / source.stem
        keep.mkdir()
        command = [nvcc, *NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-c", str(source),
                   "-o", str(out / f"{source.stem}.o"), "-keep", f"-keep-dir={keep}"]
        jobs[source.name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobs[HOPPER_SELFTEST_SOURCE.name] = subprocess.Popen(
        [nvcc, *NVCC_FLAGS, "-x", "cu", "-arch=sm_90a", "-Xptxas", "-v", "-c", str(HOPPER_SELFTEST_SOURCE),
         "-o", str(out / "hopper_selftest.o")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reports = {}
    for name, job in jobs.items():
        text, _ = job.communicate(timeout=1200)
        assert job.returncode == 0, f"nvcc failed on {name}:\n{text[-4000:]}"
        reports[name] = text
    # each virtual architecture's PTX as the -c runs above generated it for their SASS
    for name, (source, arch) in {"ptx": (SELFTEST_SOURCE, "80"), "conv.ptx": (CSRC / "cuda" / "conv.cu", "80"),
                                 "conv_sm90a.ptx": (CSRC / "cuda" / "conv.cu", "90a")}.items():
        reports[name] = (out / source.stem / f"{source.stem}.compute_{arch}.ptx").read_text()
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(out / "conv.o")], capture_output=True, text=True)
    assert sass.returncode == 0, sass.stderr[-4000:]
    reports["conv.sass"] = sass.stdout
    # the same SASS as the performance model's own -cubin runs: its cache gets these instead
    # (tests/test_perf_model.py; a copy, where its compile would take a core for a minute)
    for source in KERNEL_SOURCES:
        for arch in TARGET_ARCHS:
            cuda_cubin(arch, source, built=out / source.stem / f"{source.stem}.compute_{build_config.sass_target(arch)}.cubin")
    for source in [*KERNEL_SOURCES, SELFTEST_SOURCE]:
        shutil.rmtree(out / source.stem)  # nvcc's intermediate files: 300 MB
    return reports


def test_kernel_sources_exist():
    assert [s.name for s in KERNEL_SOURCES] == ["batch_norm.cu", "conv.cu", "ensemble.cu"], "update the expectations below"


@pytest.mark.parametrize("source", [s.name for s in KERNEL_SOURCES] + [SELFTEST_SOURCE.name,
                                                                        HOPPER_SELFTEST_SOURCE.name])
def test_every_kernel_compiles_for_every_target_without_spills(compiled, source):
    kernels = parse_ptxas_verbose(compiled[source])
    assert kernels, f"ptxas reported no kernels for {source}"
    names = {k["name"] for k in kernels}
    archs = [90] if source == HOPPER_SELFTEST_SOURCE.name else TARGET_ARCHS
    for arch in archs:
        target = f"sm_{build_config.sass_target(arch)}"
        assert {k["name"] for k in kernels if k["arch"] == target} == names, f"{target} misses kernels"
    for k in kernels:
        where = f"{k['name']} on {k['arch']}"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{where} spills: {k}"
        assert k["smem"] <= 48 * 1024, f"{where} needs more static shared memory than a launch gets: {k}"


def test_ensemble_kernels_fit_their_launch_bounds(compiled):
    kernels = parse_ptxas_verbose(compiled["ensemble.cu"])
    # 4 ops x 3 dtypes x (vectorised, scalar) x 4 archs
    assert len(kernels) == 4 * 3 * 2 * len(TARGET_ARCHS)
    for k in kernels:
        assert k["registers"] * MAX_THREADS <= REGISTERS_PER_SM, k


CONV_THREADS = 128  # conv.cuh's kThreads (its __launch_bounds__)


# Per problem: fp32 (FMA and TF32, each 16-byte and scalar loads) + per 16-bit type (cp.async
# pipeline, scalar loads; the forward's pipeline on the 64 x 64 and the narrow 128 x 16 tile),
# twice for the problems with an input prologue (kernels with and without it); the sm_90 forward
# per 16-bit type and tile (64 x 128, 128 x 64).
CONV_KERNELS_PER_ARCH = {"forward": 2 * (2 * 2 + 2 * 3), "input_grad": 2 * 2 + 2 * 2, "weight_grad": 2 * (2 * 2 + 2 * 2),
                         "forward_sm90": 2 * 2, "weight_rewrite": 2}  # rewrite: the 16-bit types
SM90_KERNEL = "forward_sm90_kernel"
TF32_PROBLEM = "OnTf32"  # conv.cuh's OnTf32<Problem>: fp32 on TF32 tensor cores
WEIGHT_REWRITE_KERNEL = "reversed_swapped_weight_kernel"  # a copy: no tensor cores


def test_conv_kernels_fit_their_launch_bounds(compiled):
    kernels = parse_ptxas_verbose(compiled["conv.cu"])
    assert len(kernels) == sum(CONV_KERNELS_PER_ARCH.values()) * len(TARGET_ARCHS)
    for k in kernels:
        assert k["registers"] * CONV_THREADS <= REGISTERS_PER_SM, k


BN_THREADS = 256  # batch_norm.cuh's kThreads (its __launch_bounds__)


def test_batch_norm_kernels_fit_their_launch_bounds(compiled):
    kernels = parse_ptxas_verbose(compiled["batch_norm.cu"])
    # (stats, normalize, backward reduce, backward elementwise) x 3 dtypes x (16-byte, 8-byte,
    # scalar chunks) x (channels_last, NCHW) + finalize x 3 dtypes + backward finalize, x 4 archs
    assert len(kernels) == (4 * 3 * 3 * 2 + 3 + 1) * len(TARGET_ARCHS)
    for k in kernels:
        assert k["registers"] * BN_THREADS <= REGISTERS_PER_SM, k


def _ptx_entries(ptx: str) -> dict:
    """Kernel name -> its PTX body."""
    entries = {}
    for chunk in ptx.split(".entry ")[1:]:
        entries[chunk.split("(", 1)[0].strip()] = chunk
    return entries


def test_conv_half_paths_use_tensor_cores(compiled):
    entries = _ptx_entries(compiled["conv.ptx"])
    assert len(entries) == sum(CONV_KERNELS_PER_ARCH.values()), sorted(entries)
    for name, body in entries.items():
        # mangled element types: __half (6__half), __nv_bfloat16 (13__nv_bfloat16), float (If)
        sixteen_bit = "6__half" in name or "13__nv_bfloat16" in name
        uses_mma = "mma.sync" in body
        if SM90_KERNEL in name or WEIGHT_REWRITE_KERNEL in name:  # wgmma, only in sm_90a code
            # (test_sm90_forward_uses_wgmma_and_tensor_copies); the rewrite copies elements
            assert not uses_mma and "wgmma" not in body, name
            continue
        tf32 = TF32_PROBLEM in name
        assert uses_mma == (sixteen_bit or tf32), f"{name}: tensor cores {'missing' if sixteen_bit or tf32 else 'used for fp32'}"
        if tf32:  # operands rounded to TF32 as they are staged, then m16n8k8 TF32 tiles
            assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in body, name
            assert "cvt.rna.tf32.f32" in body and "ldmatrix" not in body, name


def test_conv_fp32_tf32_kernels_run_hmma_in_sass(compiled):
    """Every fp32 TF32 conv kernel runs TF32 HMMA on every target (sm_80/86/89/90a); the FMA
    ones none."""
    sass = compiled["conv.sass"]
    functions = [chunk for chunk in sass.split("Function : ")[1:]]
    tf32 = [code for code in functions if TF32_PROBLEM in code.split()[0]]
    # (16-byte, scalar loads) x (forward and weight gradient with and without a prologue, input gradient)
    assert len(tf32) == 2 * (2 + 2 + 1) * len(TARGET_ARCHS)
    for code in tf32:
        assert "HMMA.1688.F32.TF32" in code, code.split()[0]  # m16n8k8: one instruction
    for code in functions:
        if "gemm_kernelIfLi" in code.split()[0] and TF32_PROBLEM not in code.split()[0]:
            assert "HMMA" not in code, code.split()[0]


def test_conv_pipelined_kernels_use_cp_async(compiled):
    """gemm_kernel<T, VEC, STAGES, BLOCK_M, BLOCK_N, Problem>: the STAGES = 3 instantiations
    (mangled "Li3E" after the VEC argument) copy with cp.async (zero-filling form, groups, waits);
    the others don't."""
    entries = _ptx_entries(compiled["conv.ptx"])
    pipelined = {name for name in entries if "Li8ELi3E" in name}
    # (half, bfloat16) x (3 problems, 2 with a prologue; the forward's narrow tile with and without)
    assert len(pipelined) == 2 * (5 + 2), sorted(entries)
    for name, body in entries.items():
        if name in pipelined:
            assert "cp.async.cg.shared.global" in body, f"{name}: no cp.async"
            assert "cp.async.commit_group" in body and "cp.async.wait_group 1" in body, name
            assert "cp.async.wait_group 0" in body, name
        elif SM90_KERNEL not in name:  # the sm_90 forward gathers its A operand by cp.async too
            assert "cp.async" not in body, f"{name}: cp.async outside the pipelined kernels"


def test_sm90_forward_uses_wgmma_and_tensor_copies(compiled):
    """conv_sm90.cuh for sm_90a: wgmma m64nNk16 (64 x 128 and 128 x 64 tiles; half and bfloat16) from descriptors,
    committed and drained one group behind; the weight by 2-D tensor copies completing on mbarriers
    (expect_tx, parity waits); the activations by cp.async made visible to wgmma by the proxy
    fence. In the SASS: 4 HGMMA per K slice and per kernel, and ptxas injected no warpgroup waits
    (which would serialise the wgmma: accumulators touched between them)."""
    entries = {n: b for n, b in _ptx_entries(compiled["conv_sm90a.ptx"]).items() if SM90_KERNEL in n}
    assert len(entries) == CONV_KERNELS_PER_ARCH["forward_sm90"], sorted(entries)
    for name, body in entries.items():
        n = re.search(r"Li(\d+)ELi(\d+)E", name).group(2)  # forward_sm90_kernel<T, BM, BN>
        types = "bf16.bf16" if "13__nv_bfloat16" in name else "f16.f16"
        for instruction in (f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{types}", "wgmma.fence.sync.aligned",
                            "wgmma.commit_group.sync.aligned", "wgmma.wait_group.sync.aligned 1",
                            "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes",
                            "mbarrier.arrive.expect_tx", "mbarrier.try_wait.parity", "fence.proxy.async",
                            "cp.async.cg.shared.global"):
            assert instruction in body, f"{name}: no {instruction}"
    sass = compiled["conv.sass"]
    sm90a = [part.split("arch = ")[0] for part in sass.split("arch = sm_90a")[1:]]  # up to the next cubin
    kernels = [chunk for part in sm90a for chunk in part.split("Function : ")[1:] if SM90_KERNEL in chunk.split()[0]]
    assert len(kernels) == CONV_KERNELS_PER_ARCH["forward_sm90"]
    for code in kernels:
        rows = int(re.search(r"Li(\d+)ELi(\d+)E", code.split()[0]).group(1))
        assert code.count("HGMMA.64x") == 4 * rows // 64, code.split()[0]  # per 16-deep step and m64 half
        assert "UTMALDG.2D" in code and "SYNCS.PHASECHK" in code, code.split()[0]
    assert "is injected" not in compiled["conv.cu"], "ptxas serialised wgmma (warpgroup waits injected)"


def test_async_copy_wrapper_emits_cp_async(compiled):
    entries = _ptx_entries(compiled["ptx"])
    body = next(b for n, b in entries.items() if "async_pipeline_kernel" in n)
    for instruction in ("cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group 0"):
        assert instruction in body, instruction


def test_tile_interface_uses_tensor_cores(compiled):
    """pk/tile.h: mma.sync m16n8k16 for half and bfloat16, operands by ldmatrix from the shared
    space, transposed and not, in the self-test kernels and in every 16-bit conv kernel."""
    for ptx in (compiled["ptx"], compiled["conv.ptx"]):
        for types in ("f16.f16", "bf16.bf16"):
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{types}.f32" in ptx, types
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx
        assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
        assert "wmma." not in ptx


def test_target_architectures_match_the_build():
    assert build_config.cuda_arch_flags(TARGET_ARCHS) == build_config.cuda_arch_flags(
        [int(a) for a in build_config.DEFAULT_ARCHS.split(";")])
