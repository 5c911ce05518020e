#!/usr/bin/env bash
# README's main-job command: set up, then the paper's speed table - the full table on a GPU
# (all rows, fp32 and fp16, batch 128), a reduced real run on the CPU (tiny batch, few
# iterations, fp32, clearly marked as CPU numbers) - then a markdown + PNG report of the run.
# Extra arguments go to `python -m bench table` (e.g. --rows single,pe241 --batch 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
"$PY" -m bench table --report "$@"
