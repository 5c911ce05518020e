# SPDX-License-Identifier: Apache-2.0
"""Guard rails read off the conv kernels' SASS (used by tests/test_perf_model.py): the main loop
of a tensor-core conv must read its shared-memory tiles through shared-memory instructions
(LDS / LDSM / cp.async), never through generic LD/ST, which cost an address-space check per
access and, for wmma fragments, four times the instructions of LDSM."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

from . import sass

BASELINE_DIR = Path(__file__).resolve().parents[1] / "fixtures"
TOLERANCE = 0.9  # a kernel's modelled fraction may not fall more than 10 % below its baseline


def generic_accesses_in_main_loops(cubin: Path, name_filter: str = "") -> Dict[str, int]:
    """Kernel name -> generic LD/ST instructions in its main loop (one pass), for kernels whose
    names contain name_filter."""
    result = {}
    for name, code in sass.disassemble(cubin).items():
        if name_filter not in name:
            continue
        kernel = sass.analyse(name, code)
        if not kernel.main_nest:
            raise AssertionError(f"{name}: no main loop found")
        counts = kernel.nest_mix()[0].counts
        result[name] = counts.get("generic_ld", 0) + counts.get("generic_st", 0)
    return result


def row_key(row) -> str:
    return f"{row['backend']}|{row['pass']}|{row['layer']}"


def baseline_path(gpu: str, dtype: str) -> Path:
    return BASELINE_DIR / f"perf_model_{gpu}_{dtype}.json"


def baseline_from(result) -> Dict[str, object]:
    return {"gpu": result["gpu"], "dtype": result["dtype"], "batch": result["batch"],
            "label": "modelled fractions (SASS-level model), not measurements",
            "fractions": {row_key(r): round(r["fraction"], 4)
                          for r in result["rows"] if "error" not in r}}


def regressions(result, baseline) -> List[str]:
    """Kernels whose modelled fraction fell more than 10 % below the baseline, or went missing."""
    now = {row_key(r): r for r in result["rows"]}
    found = []
    for key, before in baseline["fractions"].items():
        row = now.get(key)
        if row is None or "error" in row:
            found.append(f"{key}: not modelled now ({row.get('error') if row else 'missing'})")
        elif row["fraction"] < TOLERANCE * before:
            found.append(f"{key}: modelled fraction {row['fraction']:.4f} < 0.9 x baseline "
                         f"{before:.4f} ({row['config']}, bound {row['bound']})")
    return found


def write_baseline(result, path: Path) -> None:
    path.write_text(json.dumps(baseline_from(result), indent=1, sort_keys=True) + "\n")
