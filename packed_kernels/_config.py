# SPDX-License-Identifier: Apache-2.0
"""The environment variables the library reads while it runs, in one place, each read when it
is used (never at import, so setting one in a running process takes effect).

  PACKED_KERNELS_DISPATCH   engine policy of backend None/"auto": measure (default) | static | torch
  PACKED_KERNELS_CACHE_DIR  folder of the measured choices (default ~/.cache/packed_kernels)
  PACKED_KERNELS_AUTOTUNE   0: Triton tile configs from the heuristic, never benchmarked

The build reads PACKED_KERNELS_NO_CUDA, _NO_SIMT, _NO_HOST and _CUDA_ARCHS (setup.py), the test
harness PACKED_KERNELS_REQUIRE (tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

DISPATCH_MODES = ("measure", "static", "torch")


def _flag(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0") not in ("", "0")


def dispatch_mode() -> str:
    value = os.environ.get("PACKED_KERNELS_DISPATCH", "measure")
    if value not in DISPATCH_MODES:
        raise ValueError(f"PACKED_KERNELS_DISPATCH must be one of {DISPATCH_MODES}, got {value!r}")
    return value


def cache_dir() -> Path:
    root = os.environ.get("PACKED_KERNELS_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "packed_kernels"


def autotune() -> bool:
    return _flag("PACKED_KERNELS_AUTOTUNE", True)
