#!/usr/bin/env bash
# The exhaustive GPU check (bench/gpu_quick.sh is the one-lease version). On a CUDA GPU machine:
#   1. records the environment (GPU, driver, torch/triton/cuDNN versions, commit),
#   2. builds everything (scripts/setup.sh: packed_kernels._C for sm_80/86/89/90, _simt),
#   3. runs the whole test suite, `gpu` tests included (a missing cuda/triton backend fails),
#   4. runs compute-sanitizer memcheck and racecheck over the CUDA tests,
#   5. runs the benchmarks (ensemble ops, conv sweep, batch norm, speed table, pytest-benchmark),
#   6. turns the records into report.md + PNG plots.
# Everything goes under bench/results/<date>-<gpu>/ (one log per step, steps.tsv with each
# step's exit status). Every step runs even if an earlier one failed; the exit status is 1 if
# any failed. `bash bench/gpu_check.sh --dry-run` prints the steps without running them;
# `--only setup,tests` runs just the named steps (a lent GPU machine allows 10 minutes per
# command: run the check in a few calls into the same GPU_CHECK_OUT folder). GPU_CHECK_PYTEST_ARGS
# adds arguments to the tests step's pytest (e.g. "-n 8" where pytest-xdist is installed, or a
# -k selection to split the suite across calls).
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"
DRY_RUN=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --dry-run, --only step1,step2)" >&2; exit 2 ;;
  esac
  shift
done

if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch; this command is for GPU machines" >&2
  echo "(on the CPU: bash scripts/test.sh for the tests, bash scripts/bench.sh for the reduced benchmark)" >&2
  exit 2
fi

if [[ $DRY_RUN == 1 ]]; then
  GPU_SLUG="<gpu>"
else
  GPU_SLUG="$("$PY" -c "import torch; from bench.env import device_slug; print(device_slug(torch.device('cuda')))")"
fi
OUT="${GPU_CHECK_OUT:-bench/results/$(date -u +%Y-%m-%d)-${GPU_SLUG}}"
[[ $DRY_RUN == 0 ]] && mkdir -p "$OUT"
FAILED=0

step() {  # step <name> <command...>: run it, log to $OUT/<name>.log, record its status
  local name="$1"; shift
  [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]] && return 0
  if [[ $DRY_RUN == 1 ]]; then
    printf '%-22s %s\n' "$name" "$*"
    return 0
  fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%ss\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$OUT/steps.tsv"
  if [[ $rc != 0 ]]; then
    FAILED=1
    echo "   FAILED (exit $rc), last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  else
    echo "   ok ($((SECONDS - start)) s)"
  fi
  return 0
}

SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
command -v compute-sanitizer >/dev/null 2>&1 && [[ ! -x "$SANITIZER" ]] && SANITIZER="$(command -v compute-sanitizer)"
# The CUDA tests: the cuda backend's kernels (the simt-named tests share their kernel sources;
# the ASan/UBSan self-tests of the CPU build are not CUDA code and run in the tests step).
CUDA_TESTS=(-m pytest -q -x tests -k "(cuda or simt) and not sanitiz" -p no:cacheprovider)
# Without torch's caching allocator every tensor is its own allocation, so memcheck sees
# out-of-bounds accesses that would otherwise land inside a cached block.
SAN_ENV=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 PACKED_KERNELS_REQUIRE=cuda)

step setup        bash scripts/setup.sh
step environment  "$PY" -c "import json, sys, torch; from bench.env import environment; json.dump(environment(torch.device('cuda')), sys.stdout, indent=1)"
step nvidia-smi   nvidia-smi -q
# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of arguments: split on purpose
step tests        env PACKED_KERNELS_REQUIRE=cuda,triton "$PY" -m pytest -ra tests --junitxml="$OUT/tests.xml" ${GPU_CHECK_PYTEST_ARGS:-}
step memcheck     "${SAN_ENV[@]}" "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no "$PY" "${CUDA_TESTS[@]}"
step racecheck    "${SAN_ENV[@]}" "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" "${CUDA_TESTS[@]}"
step bench-ensemble "$PY" -m bench ensemble --quiet --out "$OUT"
step bench-conv   "$PY" -m bench conv --quiet --out "$OUT"
step bench-bn     "$PY" -m bench bn --quiet --out "$OUT"
step bench-table  "$PY" -m bench table --quiet --out "$OUT"
step bench-table-channels-last "$PY" -m bench table --quiet --layout channels_last --precision fp16 --out "$OUT"
# The packed_kernels rows again with every layer forced onto the Triton kernels (the default
# rows use the library's auto policy, which keeps cuDNN until these runs show a kernel faster).
step bench-table-triton "$PY" -m bench table --quiet --layout channels_last --precision fp16 \
  --rows single-stock,pe241-stock,pe241-packed_kernels,pe242-stock,pe242-packed_kernels --ours-backend triton --out "$OUT"
step bench-pytest "$PY" -m pytest -q bench --benchmark-json="$OUT/pytest-benchmark.json"
step report       "$PY" -m bench report "$OUT" --out "$OUT"

if [[ $DRY_RUN == 1 ]]; then
  echo "(dry run: results would go to $OUT)"
  exit 0
fi
echo "gpu_check: results in $OUT (steps.tsv, *.log, records *.json, report.md, *.png)"
[[ -f "$OUT/bench-table.log" ]] && grep -E "^(==|Single|PE-|Deep|MIMO|Batch|Targets|  PE)" "$OUT/bench-table.log"
exit $FAILED
