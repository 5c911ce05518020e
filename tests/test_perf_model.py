# SPDX-License-Identifier: Apache-2.0
"""The SASS-level performance model (`python -m bench model`) and its guard rails, without a GPU.

One run models every conv layer of PE-(2,4,1) and PE-(2,4,2) (CIFAR-100 ResNet-50, batch 128,
fp16) on an H100, Triton and CUDA C++, forward / input grad / weight grad, and their batch norms
and ensemble ops forward / backward, in a separate process
(this suite runs Triton's interpreter; the model compiles for the real target). Fails on: a
layer that cannot be modelled, a register spill, generic LD/ST for shared tiles in a conv main
loop, a kernel whose modelled fraction falls more than 10 % below bench/fixtures' baseline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REQUIRED, once_per_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.perf_model import checks, sass  # noqa: E402


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _nvcc_or_skip():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if (Path(home) / "bin" / "nvcc").exists() or shutil.which("nvcc"):
        return
    if "cuda" in REQUIRED:
        pytest.fail("nvcc is required here but not found (set CUDA_HOME)")
    pytest.skip("nvcc not found (set CUDA_HOME=/usr/local/cuda)")


@pytest.fixture(scope="module")
def modelled(tmp_path_factory):
    """One model run per test run, however many workers run these tests."""
    return once_per_run(tmp_path_factory, "perf_model", _model)


def _model(folder: Path) -> dict:
    _nvcc_or_skip()
    out = folder / "h100-fp16.json"
    done = subprocess.run([sys.executable, "-m", "bench", "model", "--gpu", "h100", "--dtype", "fp16",
                           "--quiet", "--json", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"bench model wrote nothing:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_every_layer_and_pass_is_modelled(modelled):
    errors = [f"{checks.row_key(r)}: {r['error']}" for r in modelled["rows"] if "error" in r]
    assert not errors, "\n".join(errors)
    covered = {(r["backend"], r["op"], r["pass"]) for r in modelled["rows"]}
    assert covered == {(b, "conv", p) for b in ("triton", "cuda") for p in ("forward", "input_grad", "weight_grad")} | {
        (b, op, p) for b in ("triton", "cuda") for op in ("batch_norm", "ensemble_mean", "ensemble_scores")
        for p in ("forward", "backward")}
    convs = [r for r in modelled["rows"] if r["op"] == "conv"]
    assert all(r["main_loop"]["tensor"] > 0 for r in convs), "fp16 convs must use tensor cores"
    # every batch-norm variant of the bottleneck blocks, on every activation shape
    variants = {r["layer"].split()[2] for r in modelled["rows"] if r["op"] == "batch_norm"}
    assert variants == {"relu", "residual_relu", "plain"}


def test_bandwidth_kernels_move_at_least_their_compulsory_bytes(modelled):
    """Batch norm and ensemble: memory-bound at this size or issue-bound, never above their roofline;
    the training batch norm reads its input twice (statistics, then normalisation)."""
    for r in modelled["rows"]:
        if r["op"] == "conv":
            continue
        assert r["fraction"] <= 1 + 1e-9, checks.row_key(r)
        assert sum(p["moved_bytes"] for p in r["per_launch"]) == r["moved_bytes"]
        if r["op"] == "batch_norm" and r["pass"] == "forward":
            c, (h, w) = int(r["layer"].split()[3]), map(int, r["layer"].split("@")[1].split("x"))
            x_bytes = modelled["batch"] * c * h * w * 2
            assert r["moved_bytes"] >= r["compulsory_bytes"] + x_bytes, checks.row_key(r)


def test_whole_model_step_sums_its_layers(modelled):
    for key, w in modelled["whole_model"].items():
        backend, model = key.split("/", 1)
        assert w["missing"] == 0, key
        convs = sum(r["modelled_us"] * r["counts"].get(model, 0) for r in modelled["rows"]
                    if r["backend"] == backend and r["op"] == "conv")
        assert w["modelled_us_by_op"]["conv"] == pytest.approx(convs)
        assert w["modelled_us"] > convs and 0 < w["fraction"] < 1


RECORD_FIELDS = ("backend", "layer", "pass", "dtype", "gpu", "flops", "compulsory_bytes", "moved_bytes",
                 "modelled_us", "roofline_us", "fraction", "main_loop")


def test_records_carry_the_documented_fields(modelled):
    for r in modelled["rows"]:
        missing = [f for f in RECORD_FIELDS if f not in r]
        assert not missing, f"{checks.row_key(r)}: no {missing}"
        assert r["fraction"] == pytest.approx(r["roofline_us"] / r["modelled_us"])
        assert r["moved_bytes"] >= r["compulsory_bytes"] > 0
        assert r["modelled_us"] >= max(r["terms_us"].values()) * (1 - 1e-9)  # the first launch's binding term


def test_no_spills(modelled):
    spilled = [f"{checks.row_key(r)} ({r['kernel']}): {r['spill_instructions']} local loads/stores"
               for r in modelled["rows"] if r.get("spill_instructions")]
    assert not spilled, "\n".join(spilled)


def test_modelled_fractions_hold_the_baseline(modelled):
    baseline = json.loads(checks.baseline_path("h100", "fp16").read_text())
    found = checks.regressions(modelled, baseline)
    assert not found, "\n".join(found) + (
        "\n(if intended: python -m bench model --gpu h100 --dtype fp16 --json /tmp/m.json, then "
        "bench.perf_model.checks.write_baseline)")


def test_conv_main_loops_read_shared_tiles_as_shared(modelled):
    """The layers' main loops, Triton and CUDA C++: no generic LD/ST."""
    suspects = [f"{checks.row_key(r)} ({r['kernel']}): {r['generic_shared_suspects']} generic LD/ST"
                for r in modelled["rows"] if r["op"] == "conv" and r.get("generic_shared_suspects")]
    assert not suspects, "\n".join(suspects)


@pytest.mark.parametrize("arch", (80, 90))
@pytest.mark.parametrize("dtype", ("6__half", "f", "13__nv_bfloat16"))
def test_every_cuda_conv_instantiation_reads_shared_tiles_as_shared(arch, dtype):
    _nvcc_or_skip()
    from bench.perf_model.kernels import cuda_cubin
    found = checks.generic_accesses_in_main_loops(cuda_cubin(arch), f"gemm_kernelI{dtype}L")
    # (VEC, STAGES) x three problems, + 2 x 2 with a prologue, + 16-bit: the forward's narrow tile
    # x 2; fp32: all of it twice, on FMAs and on TF32
    assert len(found) == (2 * 10 if dtype == "f" else 12), sorted(found)
    bad = {name: n for name, n in found.items() if n}
    assert not bad, bad


def test_generic_shared_check_catches_an_integer_realigned_buffer(tmp_path):
    """Mutation: realigning the conv's shared buffer through an integer makes nvcc lose the address
    space; the check must then see generic loads in the main loops that read the tiles through
    C++ pointers (the input prologue's). ldmatrix and cp.async name the shared space themselves
    (pk/tile.h, pk/async_copy.h), so the loops without a prologue stay LDSM/LDGSTS either way."""
    _nvcc_or_skip()
    from bench.perf_model.kernels import cuda_cubin
    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", copy, ignore=shutil.ignore_patterns("simt", "tests"))
    header = copy / "kernels" / "conv.cuh"
    text = header.read_text()
    declaration = "PK_SHARED(unsigned char, shared, Config::kSharedBytes);"
    assert declaration in text, "update this mutation to conv.cuh's shared buffer declaration"
    header.write_text(text.replace(declaration, (
        "PK_SHARED(unsigned char, shared_raw, Config::kSharedBytes + 32);\n"
        "  unsigned char* const shared = reinterpret_cast<unsigned char*>(\n"
        "      (reinterpret_cast<std::uintptr_t>(shared_raw) + 31) & ~std::uintptr_t(31));")))
    found = checks.generic_accesses_in_main_loops(
        cuda_cubin(90, copy / "cuda" / "conv.cu", copy), "gemm_kernelI6__halfLi8ELi3ELi64ELi64ENS1_12WithPrologue")
    assert found and all(n > 0 for n in found.values()), found


SYNTHETIC = """
	Function : nested
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R2, 0x1, PT ;
        /*0020*/               @P0 BRA 0x90 ;
        /*0030*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0040*/                   LDS.128 R4, [R8] ;
        /*0050*/                   HMMA.16816.F32 R12, R4, R6, R12 ;
        /*0060*/                   ISETP.GE.AND P1, PT, R3, R9, PT ;
        /*0070*/              @!P1 BRA 0x30 ;
        /*0080*/                   IADD3 R2, R2, -0x1, RZ ;
        /*0090*/                   LD.E R10, desc[UR4][R10.64] ;
        /*00a0*/               @P2 BRA 0x10 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_sass_reader_finds_the_innermost_tensor_core_loop():
    (code,) = sass.parse_sass(SYNTHETIC).values()
    kernel = sass.analyse("nested", code)
    inner, outer = kernel.nest_mix()
    assert inner.instructions == 5 and inner.counts["tensor"] == 1 and inner.counts["lds"] == 1
    # the outer loop's own instructions: the compare and branch at its head, the tail
    assert outer.counts.get("generic_ld") == 1 and outer.counts.get("tensor") is None
    assert outer.instructions == 5
    assert kernel.outside_mix().instructions == 2  # MOV and EXIT (the self-branch is padding)
