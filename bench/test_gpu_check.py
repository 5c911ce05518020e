# SPDX-License-Identifier: Apache-2.0
"""bench/gpu_check.sh's step plan, checked through its dry run (the real run needs a GPU)."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"


def _dry_run(*args):
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True)
    steps = [line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith("(")]
    return result.returncode, steps


def test_dry_run_lists_build_tests_sanitizers_and_benchmarks():
    rc, steps = _dry_run()
    assert rc == 0
    assert steps[0] == "setup"
    for needed in ("tests", "memcheck", "racecheck", "bench-table", "report"):
        assert needed in steps


def test_only_runs_the_named_steps_in_order():
    rc, steps = _dry_run("--only", "report,tests")
    assert rc == 0
    assert steps == ["tests", "report"]


def test_unknown_argument_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown argument" in result.stderr


def test_extra_pytest_arguments_reach_the_tests_step():
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "tests"], capture_output=True,
                            text=True, env={**os.environ, "GPU_CHECK_PYTEST_ARGS": "-n 8 -k conv"})
    assert result.returncode == 0
    assert result.stdout.splitlines()[0].endswith("tests.xml -n 8 -k conv")


QUICK = Path(__file__).resolve().parent / "gpu_quick.sh"


def test_quick_check_fits_one_lease():
    """gpu_quick.sh: the build in the background, then each step with a time limit; the limits
    sum to what the dry run states, under 8 minutes."""
    result = subprocess.run(["bash", str(QUICK), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    steps = {line.split()[0]: line.split()[1] for line in lines if line and not line.startswith("(")}
    assert list(steps) == ["build", "model", "table-stock", "dispatch", "table-ours", "overhead", "profile",
                           "tests", "compare"]
    limits = [int(limit.rstrip("s")) for name, limit in steps.items() if name not in ("build", "model")]
    stated = int(lines[-1].split("at most ")[1].split(" s")[0])
    assert sum(limits) == stated <= 8 * 60
    assert "PACKED_KERNELS_CUDA_ARCHS=<arch>" in lines[0]  # this GPU's architecture only
    # measured beside modelled per layer: the model for this GPU, joined with the dispatch step's times
    assert "bench model --gpu <gpu>" in lines[1] and "model.json" in lines[1]
    assert "bench.model_vs_measured" in lines[-2] and lines[-2].endswith("-quick")


def test_quick_check_refuses_unknown_arguments():
    result = subprocess.run(["bash", str(QUICK), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument" in result.stderr
