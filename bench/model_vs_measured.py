# SPDX-License-Identifier: Apache-2.0
"""Measured beside modelled time per conv layer and pass: the engine decisions a GPU run measured
(`bench dispatch` records: GPU us per call of each engine, in the model's own calls) joined with
`bench model --json` records on the decision key (pass, weight shape, groups, stride, padding,
dilation, output pixels to the next power of two). Fused variants (the decision's options) are
listed beside the plain conv the model compiles.

    python -m bench.model_vs_measured MODEL.json DISPATCH_RECORDS_DIR_OR_FILE
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List

from . import records

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_PASSES = {"forward": "forward", "fused_forward": "forward", "input_grad": "input_grad",
           "weight_grad": "weight_grad"}


def _geometry_key(parts: List[str]) -> str:
    """weight|groups|stride|padding|dilation|pixels of a decision key, spaces dropped."""
    return "|".join(p.replace(" ", "") for p in parts[4:10])


def model_key(row: Dict[str, object]) -> str:
    g = row["geometry"]
    fields = [tuple(g["weight"]), g["groups"], tuple(g["stride"]), tuple(g["padding"]),
              tuple(g["dilation"]), g["pixels"]]
    return "|".join(str(f).replace(" ", "") for f in fields)


def join(model: Dict[str, object], decisions: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """One line per (layer, pass, backend, decision variant): modelled and measured us."""
    measured: Dict[tuple, List[tuple]] = {}
    for d in decisions:
        parts = d["key"].split("|")
        if len(parts) < 10 or parts[2] != _DTYPES[model["dtype"]] or parts[3] != "channels_last":
            continue
        if parts[0] not in _PASSES:
            continue
        options = "|".join(p for p in parts[10:] if "=" not in p) or "plain"
        variant = options if parts[0] != "fused_forward" else f"fused {options}"
        measured.setdefault((_PASSES[parts[0]], _geometry_key(parts)), []).append(
            (variant, d.get("timings_us", {})))
    lines = []
    for row in model["rows"]:
        if row.get("op", "conv") != "conv" or "error" in row:
            continue
        for variant, times in measured.get((row["pass"], model_key(row)), []):
            got = times.get(row["backend"])
            lines.append({"layer": row["layer"], "pass": row["pass"], "backend": row["backend"],
                          "variant": variant, "modelled_us": row["modelled_us"], "measured_us": got,
                          "cudnn_us": times.get("torch"),
                          "ratio": got / row["modelled_us"] if got else None})
    return lines


def format_lines(lines: List[Dict[str, object]], gpu: str) -> str:
    if not lines:
        return "no measured layer matched a modelled one (no dispatch record, or other shapes)"
    out = [f"measured (GPU us per call, engine decisions) beside modelled (SASS-level model, {gpu})",
           f"{'backend':7} {'pass':11} {'layer':44} {'variant':18} {'modelled':>9} {'measured':>9} "
           f"{'cuDNN':>9} {'meas/mod':>8}"]
    for x in lines:
        cell = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9}"  # noqa: E731
        ratio = f"{x['ratio']:8.2f}" if x["ratio"] is not None else f"{'-':>8}"
        out.append(f"{x['backend']:7} {x['pass']:11} {x['layer'][:44]:44} {x['variant'][:18]:18} "
                   f"{cell(x['modelled_us'])} {cell(x['measured_us'])} {cell(x['cudnn_us'])} {ratio}")
    for (backend, pass_name), ratios in summary(lines).items():
        out.append(f"geomean measured / modelled, {backend} {pass_name}: {ratios[0]:.2f} over {ratios[1]} layers")
    return "\n".join(out)


def summary(lines: List[Dict[str, object]]) -> Dict[tuple, tuple]:
    """(backend, pass) -> (geometric mean of measured / modelled, layers measured)."""
    groups: Dict[tuple, List[float]] = {}
    for x in lines:
        if x["ratio"]:
            groups.setdefault((x["backend"], x["pass"]), []).append(x["ratio"])
    return {k: (math.exp(sum(map(math.log, v)) / len(v)), len(v)) for k, v in sorted(groups.items())}


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file():
        print(f"no model record at {argv[0]} (bench model did not finish)", file=sys.stderr)
        return 1
    model = json.loads(Path(argv[0]).read_text())
    decisions = [row for record in records.load_records([Path(argv[1])]) if record.get("kind") == "dispatch"
                 for row in record.get("rows", [])]
    print(format_lines(join(model, decisions), model.get("gpu_name", model.get("gpu", "?"))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
