#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (kept if already installed, e.g. on a GPU machine),
# the dev tools, and packed_kernels itself with its compiled extensions. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.14.1"
fi
"$PY" -m pip install -q -r requirements-dev.txt
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
