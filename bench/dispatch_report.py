# SPDX-License-Identifier: Apache-2.0
"""The engine decisions behind backend="auto" for a speed-table row's model: one training and
one inference step (fp16 autocast, channels_last, batch 128 by default) make every kind of
convolution the model runs decide its engines, measured on this GPU against cuDNN; the report
lists each decision with the per-engine times behind it (the fastest wins). On the CPU nothing
is measured (auto is the torch engine there): the report says so.

    python -m bench dispatch --rows pe241-packed_kernels
"""

from __future__ import annotations

from typing import Dict, List

import torch

from packed_kernels import dispatch

from .step_profile import ProfileConfig, row_steps


def warm(keys: List[str], cfg: ProfileConfig, device: torch.device) -> List[Dict[str, object]]:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the speed table times the cuDNN side
    for key in keys:
        model, train_step, infer_step = row_steps(key, cfg, device)
        model.train()
        train_step()
        model.eval()
        infer_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return dispatch.report()


ENGINES = ("torch", "triton", "cuda")


def format_report(rows: List[Dict[str, object]], label: str) -> str:
    if not rows:
        return f"no engine decisions on {label} (backend auto measures on CUDA tensors only)"
    lines = [f"engine decisions on {label}: GPU us per call, measured (torch = cuDNN); "
             "key = pass|gpu|dtype|layout|weight shape|groups|stride|padding|dilation|pixels|...",
             f"{'chosen':7} " + " ".join(f"{e:>9}" for e in ENGINES) + "  key / rejected"]
    wins = {}
    for r in rows:
        times = r.get("timings_us", {})
        cells = " ".join(f"{times[e]:9.1f}" if e in times else f"{'-':>9}" for e in ENGINES)
        key = "|".join(p for i, p in enumerate(r["key"].split("|")) if i not in (1, 2, 3)
                       and not p.startswith("torch="))
        rejected = "; ".join(f"{e}: {why}" for e, why in r.get("rejected", {}).items())
        lines.append(f"{r['engine']:7} {cells}  {key}" + (f"  [{rejected}]" if rejected else ""))
        wins[r["engine"]] = wins.get(r["engine"], 0) + 1
    lines.append("decisions per engine: " + ", ".join(f"{e} {n}" for e, n in sorted(wins.items())))
    return "\n".join(lines)
