#!/usr/bin/env bash
# What matters most on a GPU, in one call of at most ~8 minutes (a lent H100/H200's lease is
# 15 minutes, machine start included); bench/gpu_check.sh is the exhaustive check.
#
#   build     packed_kernels._C for this GPU's architecture only, in place, in the background
#             while the cuDNN-only steps run (no pip: the lent machines have no network)
#   table-stock   speed-table rows Single and PE-(2,4,1) on torch's modules, fp16 channels_last,
#             batch 128
#   dispatch  one training + inference step of PE-(2,4,1) ours: backend "auto" measures every
#             engine on every kind of conv the model runs and keeps the fastest (the per-layer,
#             per-pass times of cuDNN, Triton and the CUDA C++ kernels, in the model's own calls)
#   table-ours    the PE-(2,4,1) packed_kernels row, on those decisions
#   overhead  host time per call over torch's (the eager path's cost, on this machine's CPU)
#   profile   one training + inference step of the ours row under torch.profiler, per kernel
#   tests     the dispatch, CUDA C++ conv, fused-block and op-registration tests on the GPU,
#             interrupted at its time limit with a summary of what ran
#   model     (background, CPU only, beside the build) `bench model` for this GPU, PE-(2,4,1),
#             fp16: the modelled time of every conv layer and pass (GPU_QUICK_MODEL=<json>
#             uses a record made beforehand instead)
#   compare   measured beside modelled time per conv layer and pass: the dispatch step's
#             per-engine times joined with the model's records (bench/model_vs_measured.py)
#
# Each step has a time limit (seconds, estimated from the step's work below); SIGINT at the
# limit lets Python print what it has. Results: $GPU_QUICK_OUT (default
# bench/results/<date>-<gpu>-quick/): one log per step, steps.tsv, the JSON records.
# Tile configs are the heuristic's (PACKED_KERNELS_AUTOTUNE=0): tuning every shape would take
# the whole lease. `--dry-run` prints the steps and their limits.
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1 PACKED_KERNELS_AUTOTUNE=0
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/packed_kernels-triton-cache}"
PY="${PYTHON:-python3}"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
[[ $# -gt 0 && $DRY_RUN == 0 ]] && { echo "gpu_quick: unknown argument $1 (use --dry-run)" >&2; exit 2; }

# step limits in seconds; their sum (plus ~20 s of start-up) is the call's expected length
LIMIT_TABLE_STOCK=60 LIMIT_DISPATCH=180 LIMIT_TABLE_OURS=60 LIMIT_OVERHEAD=25 LIMIT_PROFILE=35 LIMIT_TESTS=80
LIMIT_COMPARE=15
LIMIT_MODEL=300  # background; the compare step waits for what is left of it
TOTAL=$((LIMIT_TABLE_STOCK + LIMIT_DISPATCH + LIMIT_TABLE_OURS + LIMIT_OVERHEAD + LIMIT_PROFILE + LIMIT_TESTS
         + LIMIT_COMPARE))
TEST_FILES=(tests/test_dispatch.py tests/test_conv_cuda.py tests/test_conv_bn.py tests/test_fused_models.py
            tests/test_op_registration.py)
TABLE_ARGS=(--precision fp16 --layout channels_last --warmup 5 --reps 20 --max-seconds 4 --quiet)

if [[ $DRY_RUN == 1 ]]; then
  OUT="${GPU_QUICK_OUT:-bench/results/<date>-<gpu>-quick}"
  GPU_ARCH="<arch>"
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_quick: no CUDA GPU visible to torch; this command is for GPU machines" >&2
    exit 2
  fi
  GPU_SLUG="$("$PY" -c "import torch; from bench.env import device_slug; print(device_slug(torch.device('cuda')))")"
  GPU_ARCH="$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")"
  OUT="${GPU_QUICK_OUT:-bench/results/$(date -u +%Y-%m-%d)-${GPU_SLUG}-quick}"
  mkdir -p "$OUT"
fi
FAILED=0

step() {  # step <name> <limit s> <command...>
  local name="$1" limit="$2"; shift 2
  if [[ $DRY_RUN == 1 ]]; then
    printf '%-13s %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout -s INT -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%ss\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$OUT/steps.tsv"
  [[ $rc != 0 ]] && FAILED=1
  echo "   exit $rc after $((SECONDS - start)) s"
}

build() {
  PACKED_KERNELS_NO_SIMT=1 PACKED_KERNELS_CUDA_ARCHS="$GPU_ARCH" MAX_JOBS=8 \
    "$PY" setup.py -q build_ext --inplace
}

model() {  # the CPU-only model for this GPU (none for GPUs it has no table for)
  if [[ -n "${GPU_QUICK_MODEL:-}" ]]; then cp "$GPU_QUICK_MODEL" "$OUT/model.json"; return; fi
  local key
  key="$("$PY" -c "import torch; n = torch.cuda.get_device_name().lower(); print(next((k for k in ('h100', 'h200', 'a100', 'rtx 3090', 'rtx 4090') if k in n), '').replace(' ', ''))")"
  [[ -z "$key" ]] && { echo "no model table for $(nvidia-smi -L | head -1)"; return 1; }
  timeout -s INT "$LIMIT_MODEL" "$PY" -m bench model --gpu "$key" --dtype fp16 --models pe241 --quiet \
    --json "$OUT/model.json"
}

if [[ $DRY_RUN == 1 ]]; then
  printf '%-13s %4s   %s\n' build "bg" "PACKED_KERNELS_NO_SIMT=1 PACKED_KERNELS_CUDA_ARCHS=<arch> $PY setup.py build_ext --inplace"
  printf '%-13s %4s   %s\n' model "bg" "$PY -m bench model --gpu <gpu> --dtype fp16 --models pe241 --json $OUT/model.json (limit ${LIMIT_MODEL} s)"
else
  "$PY" -c "import json, sys, torch; from bench.env import environment; json.dump(environment(torch.device('cuda')), sys.stdout, indent=1)" > "$OUT/environment.json" 2>&1
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  start_build=$SECONDS
  ( build > "$OUT/build.log" 2>&1; echo "$? $((SECONDS - start_build))" > "$OUT/build.status" ) &
  BUILD_PID=$!
  ( model > "$OUT/model.log" 2>&1; echo "$?" > "$OUT/model.status" ) &
  MODEL_PID=$!
fi

export PACKED_KERNELS_CACHE_DIR="$OUT/cache"  # the engine decisions come back with the results
step table-stock  "$LIMIT_TABLE_STOCK"  "$PY" -m bench table --rows single-stock,pe241-stock "${TABLE_ARGS[@]}" --out "$OUT"
[[ $DRY_RUN == 0 ]] && { wait "$BUILD_PID"; echo "== build (background): exit/seconds $(cat "$OUT/build.status")"; }
step dispatch     "$LIMIT_DISPATCH"     "$PY" -m bench dispatch --rows pe241-packed_kernels --out "$OUT"
step table-ours   "$LIMIT_TABLE_OURS"   "$PY" -m bench table --rows pe241-packed_kernels "${TABLE_ARGS[@]}" --out "$OUT"
step overhead     "$LIMIT_OVERHEAD"     "$PY" -m bench overhead --out "$OUT"
step profile      "$LIMIT_PROFILE"      "$PY" -m bench profile --rows pe241-packed_kernels --out "$OUT"
step tests        "$LIMIT_TESTS"        env PACKED_KERNELS_REQUIRE=cuda,triton "$PY" -m pytest -q --maxfail=20 -p no:cacheprovider -n 8 "${TEST_FILES[@]}"
[[ $DRY_RUN == 0 ]] && { wait "$MODEL_PID"; echo "== model (background): exit $(cat "$OUT/model.status")"; }
step compare      "$LIMIT_COMPARE"      "$PY" -m bench.model_vs_measured "$OUT/model.json" "$OUT"

if [[ $DRY_RUN == 1 ]]; then
  echo "(dry run: at most $TOTAL s of steps plus start-up; results would go to $OUT)"
  exit 0
fi
echo
echo "gpu_quick: results in $OUT"
cat "$OUT/steps.tsv"
grep -E "^(==|Single|PE-|Targets|  PE)" "$OUT/table-stock.log" "$OUT/table-ours.log" 2>/dev/null | cut -c1-220
tail -n 40 "$OUT/dispatch.log" 2>/dev/null | cut -c1-220
cat "$OUT/overhead.log" 2>/dev/null
grep -E "^== " "$OUT/profile.log" 2>/dev/null | cut -c1-200
tail -n 5 "$OUT/tests.log" 2>/dev/null
cut -c1-200 "$OUT/compare.log" 2>/dev/null
exit $FAILED
