#!/usr/bin/env bash
# README's test command: set up, then run the whole suite (GPU tests run only where a GPU is).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A broken simt build must fail the run, not turn its tests into skips.
export PACKED_KERNELS_REQUIRE="${PACKED_KERNELS_REQUIRE:-simt}"
# Two pytest-xdist workers: CI has two cores (more workers: pass -n N, the last -n wins).
exec "${PYTHON:-python3}" -m pytest -q -ra -n 2 "$@"
