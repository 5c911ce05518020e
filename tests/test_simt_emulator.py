# SPDX-License-Identifier: Apache-2.0
"""The SIMT emulator (csrc/simt, csrc/include/pk): barriers, shared memory, warp collectives,
atomics, tensor-core tiles and half/bfloat16, checked by running kernels on the CPU.

The kernels live in csrc/tests/selftest_kernels.cuh (tests/test_csrc_compile.py compiles them
with nvcc too); csrc/tests/simt_selftest.cpp runs one case per invocation and prints key=value
results. The binary is built here with -fsanitize=address,undefined, so deliberate
out-of-bounds writes must be reported by AddressSanitizer, and the real ensemble kernels run
under both sanitizers."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import packed_kernels as pk
from conftest import REQUIRED, require_backend
from helpers import CSRC, build_sanitized_selftest, run_sanitized


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    return build_sanitized_selftest(CSRC / "tests" / "simt_selftest.cpp",
                                    tmp_path_factory.mktemp("simt") / "simt_selftest", "simt" in REQUIRED)


def run(binary: Path, case: str) -> subprocess.CompletedProcess:
    return run_sanitized(binary, case)


def results(binary: Path, case: str) -> dict:
    """Runs a case that must finish cleanly (no sanitizer report) and parses its key=value lines."""
    done = run(binary, case)
    assert done.returncode == 0, f"{case} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    assert "runtime error" not in done.stderr, done.stderr[-4000:]  # UBSan
    values = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


# Expectations per case, shared by the emulator run and the GPU run of the same binary source.

def check_block_sum(out):
    assert int(out["wrong_launches"]) == 0
    assert float(out["max_rel_error"]) < 1e-6


def check_warp_ops(out):
    assert int(out["mismatches"]) == 0  # xor butterfly, indexed shuffle, shuffle up, ballot, any, all
    assert float(out["shuffle_sum_rel_error"]) < 1e-6  # shfl_down reduction vs the float64 sum


def check_warp_exchange(out):
    assert int(out["mismatches"]) == 0  # shared-memory exchange within a warp, with __syncwarp


def check_block_allreduce(out):
    assert int(out["mismatches"]) == 0  # every thread holds the same, right, answer
    assert float(out["sum_rel_error"]) < 1e-6


def check_barrier_votes(out):
    assert int(out["mismatches"]) == 0  # __syncthreads_count / _and / _or on every thread


def check_histogram(out):
    assert int(out["mismatches"]) == 0  # atomics on dynamic shared memory, then global memory


def check_tile_mma(out):
    # Products of half/bfloat16 inputs are exact in float; the float accumulation of K = 64 terms
    # errs by at most K * 2^-24 relative to sum |a b|.
    bound = 64 * 2.0 ** -24
    for key in ("half_row_b", "half_col_b", "bfloat16_row_b", "bfloat16_col_b"):
        assert float(out[key]) <= bound, (key, out[key])


def check_tile_tf32(out):
    # m16n8k8 TF32 tiles: the tensor core multiplies the operands' upper 19 bits (exact products in
    # float) and to_tf32 rounds to nearest, ties away; float accumulation of K = 64 terms errs by at
    # most K * 2^-24 relative to sum |a b|. Judged against the other rounding, the error is TF32's
    # (~2^-11): the check tells truncating from rounding, and a wrong fragment layout fails both.
    bound = 64 * 2.0 ** -24
    assert float(out["truncated"]) <= bound, out
    assert float(out["rounded"]) <= bound, out
    assert float(out["truncated_as_rounded"]) > 1e-5, out
    assert float(out["rounded_as_truncated"]) > 1e-5, out


def check_transpose(out):
    assert int(out["mismatches"]) == 0  # 2-D shared tile, 2-D blocks and grid, partial edge tiles


def check_async_pipeline(out):
    assert int(out["mismatches"]) == 0  # cp.async stages with waits and barriers, zero-fill


def check_half_conversions(out):
    assert int(out["mismatches"]) == 0  # every bit pattern round-trips; ties round to even


def check_divmod(out):
    assert int(out["mismatches"]) == 0


def check_ensemble(out):
    assert int(out["non_finite"]) == 0
    assert float(out["worst_sum_error_over_tolerance"]) <= 1.0


CHECKS = {"block_sum": check_block_sum, "warp_ops": check_warp_ops, "warp_exchange": check_warp_exchange,
          "block_allreduce": check_block_allreduce, "barrier_votes": check_barrier_votes,
          "histogram": check_histogram,
          "tile_mma": check_tile_mma, "tile_tf32": check_tile_tf32, "transpose": check_transpose,
          "half_conversions": check_half_conversions, "async_pipeline": check_async_pipeline,
          "divmod": check_divmod, "ensemble": check_ensemble}


@pytest.mark.parametrize("case", sorted(CHECKS))
def test_emulator_gives_the_reference_answer(selftest, case):
    """Shared-memory reduction with barriers, warp shuffles and votes, block reductions, atomics,
    tensor-core tiles, a 2-D shared-memory transpose, a cp.async pipeline, half/bfloat16 conversions, and the real ensemble kernels (under ASan and
    UBSan: no report allowed)."""
    CHECKS[case](results(selftest, case))


def test_missing_barrier_gives_a_wrong_answer(selftest):
    # The same tree reduction without the barrier between levels: the emulator resumes threads
    # in a different order after every barrier (and per block), so every launch goes wrong.
    out = results(selftest, "missing_barrier")
    assert int(out["wrong_launches"]) == 6, out
    assert not float(out["max_rel_error"]) < 1e-3, out


def test_missing_async_wait_gives_a_wrong_answer(selftest):
    # cp.async copies land at a random time up to the wait that covers them: reading a stage
    # after the barrier but without the wait must not pass (with it: check_async_pipeline).
    assert int(results(selftest, "missing_async_wait")["mismatches"]) > 0


def test_missing_syncwarp_gives_a_wrong_answer(selftest):
    # Lanes of a warp are not in lockstep (nor on a GPU since Volta): reading a neighbour's
    # shared-memory slot without __syncwarp must not pass.
    assert int(results(selftest, "missing_syncwarp")["mismatches"]) > 0


@pytest.mark.parametrize("case, message", [
    ("early_exit", "__syncthreads() reached by 63 of 64 threads"),
    ("divergent_warp_op", "different warp ops"),
    ("tile_misaligned", "pk::tile::load_a: ldmatrix row address not 16-byte aligned"),
    ("async_not_waited", "cp.async copies it never waited for"),
])
def test_misuse_stops_the_launch_with_a_message(selftest, case, message):
    assert message in results(selftest, case)["fault"]


@pytest.mark.parametrize("case, kernel", [("oob_shared", "oob_shared_write_kernel"),
                                          ("oob_global", "oob_global_write_kernel")])
def test_out_of_bounds_write_is_caught_by_address_sanitizer(selftest, case, kernel):
    done = run(selftest, case)
    assert done.returncode != 0, "the out-of-bounds write went unnoticed"
    assert "fault=none" not in done.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr
    assert "WRITE of size 4" in done.stderr and kernel in done.stderr


# --- the extension's own checks ------------------------------------------------------------------

def test_extension_rejects_bad_outputs_before_launch():
    require_backend("simt")
    from packed_kernels import _simt
    x = torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="out must have shape"):
        _simt.ensemble_mean_forward(x, 4, torch.empty(3, 5))
    with pytest.raises(RuntimeError, match="has dtype"):
        _simt.ensemble_mean_forward(x, 4, torch.empty(2, 5, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="num_estimators must be in"):
        _simt.ensemble_mean_forward(torch.randn(130, 5), 65, torch.empty(2, 5))
    with pytest.raises(RuntimeError, match="expects 6 outputs"):
        _simt.ensemble_scores_forward(x, 4, [torch.empty(2, 5)])


def test_more_estimators_than_the_kernels_hold_says_why():
    require_backend("simt")
    with pytest.raises(pk.BackendUnavailableError, match="num_estimators <= 64"):
        pk.ensemble_mean(torch.randn(65 * 2, 5), 65, backend="simt")


# --- the same self-test on a GPU ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CHECKS))
def test_selftest_gives_the_reference_answer_on_the_gpu(gpu_selftest, case):
    CHECKS[case](results(gpu_selftest, case))


@pytest.fixture(scope="module")
def gpu_selftest(tmp_path_factory) -> Path:
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = str(home / "bin" / "nvcc") if (home / "bin" / "nvcc").exists() else shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    binary = tmp_path_factory.mktemp("gpu") / "selftest_gpu"
    command = [nvcc, "-x", "cu", "-std=c++17", "-O2", "-arch=native",
               f"-I{CSRC / 'include'}", f"-I{CSRC / 'kernels'}", f"-I{CSRC / 'tests'}",
               str(CSRC / "tests" / "simt_selftest.cpp"), "-o", str(binary)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"nvcc failed on the self-test:\n{built.stderr[-4000:]}"
    return binary


# --- the simt backend on layouts test_ensemble.py does not cover ---------------------------------

def _grads_vs_reference(logits, m, backend):
    x = logits.detach().requires_grad_(True)
    x64 = logits.detach().double().requires_grad_(True)
    ours = pk.ensemble_scores(x, m, backend=backend)
    ref = pk.ensemble_scores(x64, m, backend="torch")
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in ref[:5]]
    (g_ours,) = torch.autograd.grad(ours[:5], x, [w.to(x.dtype) for w in weights])
    (g_ref,) = torch.autograd.grad(ref[:5], x64, weights)
    return ours, ref, g_ours, g_ref


def test_sixty_four_estimators():
    require_backend("simt")
    x = torch.randn(64 * 2, 40, dtype=torch.float64) * 3
    ours, ref, g_ours, g_ref = _grads_vs_reference(x.float(), 64, "simt")
    for name, a, b in zip(pk.EnsembleScores._fields, ours, ref):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), name  # float32 math, 40 classes
    assert torch.allclose(g_ours.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_misaligned_views_take_the_scalar_path_and_match():
    # A contiguous view one element into its storage is not 16-byte aligned: the kernels must
    # fall back from vector loads (C = 64 would otherwise be vectorised).
    require_backend("simt")
    storage = torch.randn(4 * 3 * 64 + 1) * 3
    view = storage[1:].view(12, 64)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    out = pk.ensemble_mean(view, 4, backend="simt")
    assert torch.allclose(out.double(), pk.ensemble_mean(view.double(), 4, backend="torch"), rtol=1e-5, atol=1e-7)
    ours, ref, g_ours, g_ref = _grads_vs_reference(view, 4, "simt")
    assert torch.allclose(ours.probs.double(), ref.probs, rtol=1e-5, atol=1e-7)
    assert torch.allclose(g_ours.double(), g_ref, rtol=1e-4, atol=1e-7)
