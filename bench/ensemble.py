# SPDX-License-Identifier: Apache-2.0
"""The ensemble-op benchmark: ensemble_mean / ensemble_scores forward and the mean's backward,
per backend, as achieved GB/s against the card's copy bandwidth measured in the same run.

Bytes counted are the op's compulsory traffic (each input read once, each output written
once), so GB/s / copy GB/s is the fraction of the memory roof reached (target >= 0.8 on an
H100 for M=4, B=1024, C=1000, fp16)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

import packed_kernels as pk
from packed_kernels import _backend

from . import records
from .env import device_label
from .timing import copy_bandwidth, measure, rotation_count

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNEL_BACKENDS = ("triton", "cuda")  # the interpreter and the SIMT emulator are not for timing


@dataclass
class EnsembleConfig:
    num_estimators: int = 4
    batch: int = 1024
    classes: int = 1000
    dtype: str = "fp16"
    backends: Tuple[str, ...] = ()   # empty: torch + every kernel backend usable here
    warmup: int = 10
    reps: int = 100

    @classmethod
    def for_device(cls, device: torch.device) -> "EnsembleConfig":
        cfg = cls()
        if torch.device(device).type != "cuda":  # CPU fp16 math is emulated: time fp32 there
            cfg.dtype, cfg.warmup, cfg.reps = "fp32", 2, 10
        return cfg

    def as_dict(self) -> Dict[str, object]:
        return records.config_dict(self)


def usable_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    out = ["torch"]
    for b in KERNEL_BACKENDS:
        if _backend.unavailable_reason(b, device, dtype) is None and not (
                b == "triton" and device.type != "cuda"):
            out.append(b)
    return out


def op_bytes(op: str, m: int, b: int, c: int, itemsize: int) -> int:
    logits, probs = m * b * c * itemsize, b * c * itemsize
    if op == "mean_forward":
        return logits + probs
    if op == "scores_forward":
        return logits + probs + 5 * b * itemsize
    if op == "mean_backward":  # read grad and logits, write grad_logits
        return probs + 2 * logits
    raise ValueError(op)


def run(cfg: EnsembleConfig, device: torch.device, progress: bool = True) -> Dict[str, object]:
    from tqdm import tqdm
    device = torch.device(device)
    dtype = DTYPES[cfg.dtype]
    m, b, c = cfg.num_estimators, cfg.batch, cfg.classes
    backends = list(cfg.backends) or usable_backends(device, dtype)
    copy = copy_bandwidth(device)
    n_inputs = rotation_count(m * b * c * dtype.itemsize, device)
    logits = [torch.randn(m * b, c, device=device, dtype=dtype) * 4 for _ in range(n_inputs)]
    grads = [torch.randn(b, c, device=device, dtype=dtype) for _ in range(n_inputs)]
    ops = {
        "mean_forward": lambda be: lambda i: pk.ensemble_mean(logits[i % n_inputs], m, backend=be),
        "scores_forward": lambda be: lambda i: pk.ensemble_scores(logits[i % n_inputs], m, backend=be),
        "mean_backward": lambda be: lambda i: torch.ops.packed_kernels.ensemble_mean_backward(
            grads[i % n_inputs], logits[i % n_inputs], m, be),
    }
    rows = []
    jobs = [(op, be) for op in ops for be in backends]
    for op, be in tqdm(jobs, desc=f"ensemble ops [{device_label(device)}]", disable=not progress,
                       leave=False):
        row = {"op": op, "backend": be, "num_estimators": m, "batch": b, "classes": c,
               "dtype": cfg.dtype, "layout": "contiguous", "device": device_label(device)}
        try:
            stats = measure(ops[op](be), device, warmup=cfg.warmup, reps=cfg.reps)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            rows.append(row)
            continue
        nbytes = op_bytes(op, m, b, c, dtype.itemsize)
        gbps = nbytes / stats.median / 1e9
        row.update({"time": stats.as_dict(), "bytes": nbytes, "gbps": gbps,
                    "fraction_of_copy": gbps / copy["gbps"]})
        rows.append(row)
    return {"rows": rows, "copy_bandwidth": copy}


def format_result(result: Dict[str, object]) -> str:
    rows = result["rows"]
    device = rows[0]["device"] if rows else "?"
    copy = result["copy_bandwidth"]["gbps"]
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"== ensemble ops: M={r0['num_estimators']} B={r0['batch']} C={r0['classes']} "
                     f"{r0['dtype']}; copy bandwidth {copy:.1f} GB/s — {device}"
                     + ("  [CPU NUMBERS]" if device.startswith("cpu") else ""))
    lines.append(f"{'op':15} {'backend':8} {'median us [q1-q3]':>28} {'GB/s':>9} {'of copy':>8}  device")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:15} {r['backend']:8} failed: {r['error']}  {r['device']}")
            continue
        t = r["time"]
        lines.append(f"{r['op']:15} {r['backend']:8} {t['median'] * 1e6:10.1f} "
                     f"[{t['q1'] * 1e6:7.1f}-{t['q3'] * 1e6:7.1f}] {r['gbps']:9.1f} "
                     f"{r['fraction_of_copy']:7.0%}  {r['device']}")
    target = [r for r in rows if "error" not in r and r["backend"] != "torch"
              and r["op"] == "mean_forward" and r["dtype"] == "fp16"]
    for r in target:
        lines.append(f"target (on an H100): ensemble_mean {r['backend']} >= 80% of copy "
                     f"bandwidth: {r['fraction_of_copy']:.0%} here  {r['device']}")
    return "\n".join(lines)
