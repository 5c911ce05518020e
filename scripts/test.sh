#!/usr/bin/env bash
# README's test command: set up, then run the whole suite (GPU tests run only where a GPU is).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -ra "$@"
