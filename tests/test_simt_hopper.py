# SPDX-License-Identifier: Apache-2.0
"""The emulator's sm_90 layer (pk/mbarrier.h, pk/wgmma.h): wgmma reading shared-memory operands
through descriptors in every swizzle mode, mbarrier phases completing on arrivals and bulk-copy
transaction bytes, and the proxy fence between cp.async and wgmma, checked by running
csrc/tests/hopper_selftest_kernels.cuh on the CPU under ASan and UBSan. Each misuse must give a
wrong answer or stop the launch with a message, never pass."""

from __future__ import annotations

import pytest

from conftest import REQUIRED
from helpers import CSRC, build_sanitized_selftest, run_sanitized

MODES = ("none", "32b", "64b", "128b")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return build_sanitized_selftest(CSRC / "tests" / "hopper_selftest.cpp",
                                    tmp_path_factory.mktemp("hopper") / "hopper_selftest", "simt" in REQUIRED)


def results(binary, case: str) -> dict:
    done = run_sanitized(binary, case)
    assert done.returncode == 0, f"{case} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    assert "runtime error" not in done.stderr, done.stderr[-4000:]  # UBSan
    return dict(line.partition("=")[::2] for line in done.stdout.splitlines() if "=" in line)


def test_wgmma_matches_the_reference_in_every_swizzle_mode(selftest):
    # Products of half/bfloat16 inputs are exact in float; float accumulation of K = 64 terms errs
    # by at most 64 * 2^-24 relative to sum |a b|.
    out = results(selftest, "wgmma")
    assert len(out) == 12, out
    for key, value in out.items():
        assert float(value) <= 64 * 2.0 ** -24, (key, value)


def wrong(value: str) -> bool:
    """A wrong answer, or a launch the emulator stopped (the descriptor read outside shared memory)."""
    return value == "fault" or not float(value) < 1e-2


def test_operands_read_with_another_swizzle_mode_give_a_wrong_answer(selftest):
    out = results(selftest, "wgmma_wrong_swizzle")
    assert len(out) == len(MODES) * (len(MODES) - 1), out
    for key, value in out.items():
        assert wrong(value), (key, value)


def test_a_wrong_stride_byte_offset_gives_a_wrong_answer(selftest):
    out = results(selftest, "wgmma_wrong_stride")
    assert set(out) == set(MODES), out
    for key, value in out.items():
        assert wrong(value), (key, value)


def test_tiles_not_aligned_to_the_swizzle_pattern_never_pass(selftest):
    # Dynamic shared memory starts at a 32-byte aligned offset that changes between launches, as
    # it follows the static allocations on a GPU: a kernel that does not align its swizzled tiles
    # itself gets a wrong answer or a fault (an operand starting inside its pattern).
    out = results(selftest, "wgmma_unaligned")
    assert int(out["passed"]) == 0, out


def test_reading_accumulators_before_the_wait_gives_a_wrong_answer(selftest):
    # Each mma runs at issue or only at the wait covering it, at random.
    assert not float(results(selftest, "wgmma_no_wait")["error"]) < 1e-2


@pytest.mark.parametrize("case, message", [
    ("wgmma_no_fence", "wgmma.mma_async without a wgmma.fence"),
    ("wgmma_no_proxy_fence", "wgmma reads shared memory that cp.async wrote without a fence.proxy.async"),
])
def test_misuse_stops_the_launch_with_a_message(selftest, case, message):
    assert message in results(selftest, case)["fault"]


def test_tensor_copies_land_swizzled_with_zeros_past_the_edges(selftest):
    # The weight-like operand comes by a 2-D tensor copy into the 128-byte swizzle wgmma reads;
    # a box past the tensor's last rows and columns gets zeros there.
    out = results(selftest, "tma_gemm")
    assert set(out) == {"half_full", "bfloat16_edges"}, out
    for key, value in out.items():
        assert float(value) <= 64 * 2.0 ** -24, (key, value)


def test_reading_a_tensor_copy_before_its_barrier_gives_a_wrong_answer(selftest):
    assert not float(results(selftest, "tma_no_wait")["error"]) < 1e-2


def test_the_forward_launches_the_sm90_kernel_where_it_applies(selftest):
    # conv.cuh's forward on the emulator's launch architecture (PACKED_KERNELS_SIMT_ARCH): the sm_90
    # kernel for a plain 16-bit call with 8k input channels per group on 90 only; an input
    # prologue or 4 channels per group stay on the mma.sync kernel (tests/test_conv_sm90.py checks
    # its answers).
    out = results(selftest, "conv_forward_path")
    assert out == {"arch90": "1", "arch80": "0", "arch90_prologue": "0", "arch90_4_channels": "0"}, out


def test_the_stride_1_input_grad_ends_on_the_sm90_forward_where_it_applies(selftest):
    # conv.cuh's input gradient: at stride 1 on 90, with scratch for the rewritten weight (16 x 3 x 3
    # x 8 halves), the sm_90 forward; on 80, without scratch, at stride 2, with padding past the
    # taps' reach or 6 channels of grad per group, the mma.sync kernel; scratch is asked for only
    # where the route applies (90, stride 1). tests/test_conv_sm90.py checks its answers.
    out = results(selftest, "conv_input_grad_path")
    assert out == {"arch90": "1,2304", "arch80": "0,0", "arch90_no_scratch": "0,2304", "arch90_stride_2": "0,0",
                   "arch90_padding_past_the_taps": "0,0", "arch90_6_grad_channels": "0,0"}, out


def test_the_stride_1_input_grad_of_narrow_groups_ends_on_the_narrow_forward(selftest):
    # 3 input channels per group, 16 of grad: at stride 1 on 80 and 86 the forward of grad with the
    # rewritten weight (6 x 3 x 3 x 16 halves of scratch) on the mma.sync kernel's narrow tile; at
    # stride 2 or with grad not 16-byte aligned the input-gradient kernel; 8 input channels per
    # group take 16-byte runs there without scratch; on 90 the route ends on the sm_90 forward.
    # tests/test_conv_cuda.py checks the answers.
    out = results(selftest, "conv_narrow_input_grad_path")
    assert out == {"arch80": "1,1728", "arch86": "1,1728", "arch80_stride_2": "0,0", "arch80_misaligned_grad": "0,1728",
                   "arch80_8_channels": "0,0", "arch90": "0,1728"}, out


def test_bulk_copy_pipeline_gives_the_reference_answer(selftest):
    out = results(selftest, "bulk_pipeline")
    assert int(out["mismatches"]) == 0


@pytest.mark.parametrize("case", ["bulk_wrong_parity", "bulk_no_empty_wait", "bulk_no_expect_tx"])
def test_a_broken_mbarrier_pipeline_never_passes(selftest, case):
    # A wait on the wrong phase, a stage refilled before its consumers released it, or a full
    # barrier armed without its transaction bytes: a wrong sum, or a deadlock the emulator names.
    out = results(selftest, case)
    if out["fault"] == "none":
        assert int(out["mismatches"]) > 0, out
    else:
        assert "waits on an mbarrier phase that can never complete" in out["fault"], out


# --- the same self-test on an sm_90 GPU: the emulator's reading of descriptors, swizzles and
# tensor copies checked against the hardware (the misuse cases are the emulator's own) -----------

GPU_CASES = {"wgmma": test_wgmma_matches_the_reference_in_every_swizzle_mode,
             "wgmma_wrong_swizzle": test_operands_read_with_another_swizzle_mode_give_a_wrong_answer,
             "tma_gemm": test_tensor_copies_land_swizzled_with_zeros_past_the_edges,
             "bulk_pipeline": test_bulk_copy_pipeline_gives_the_reference_answer}


@pytest.fixture(scope="module")
def gpu_selftest(tmp_path_factory):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    import torch
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100/H200): the self-test is built for sm_90a")
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = str(home / "bin" / "nvcc") if (home / "bin" / "nvcc").exists() else shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    binary = tmp_path_factory.mktemp("hopper_gpu") / "hopper_selftest_gpu"
    command = [nvcc, "-x", "cu", "-std=c++17", "-O2", "-arch=sm_90a", f"-I{CSRC / 'include'}",
               f"-I{CSRC / 'kernels'}", f"-I{CSRC / 'tests'}", str(CSRC / "tests" / "hopper_selftest.cpp"),
               "-o", str(binary)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"nvcc failed on the sm_90 self-test:\n{built.stderr[-4000:]}"
    return binary


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_sm90_selftest_gives_the_reference_answer_on_the_gpu(gpu_selftest, case):
    GPU_CASES[case](gpu_selftest)
