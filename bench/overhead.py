# SPDX-License-Identifier: Apache-2.0
"""Host overhead per call: what packed_kernels' Python layer adds over the torch calls it stands
for, on shapes it has seen before (the steady state of a training loop).

Each case times ours and its torch baseline on the same tiny tensors, interleaved, as the best
of several rounds of many calls (the minimum is the overhead without the machine's noise); the
extra microseconds are the layer's cost: argument checks, backend choice, dispatch, autograd
plumbing. On a GPU the calls queue asynchronously, so the figure is host time per call. torch
runs one intra-op thread while timing: the layer is single-threaded Python, a GPU host loop has
no CPU conv threads, and on the CPU the conv's worker wake-ups add noise to both sides.
  grouped_conv2d               vs F.conv2d (target: <= 10 us extra)
  fused_conv2d, channel stats  vs F.conv2d + torch.var_mean (target: <= 20 us extra)
  grouped_conv2d, with grad    vs F.conv2d, both forward + backward (no target: reported)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import packed_kernels as pk

TARGETS_US = {"grouped_conv2d": 10.0, "fused_conv2d_stats": 20.0}


@dataclass
class OverheadConfig:
    calls: int = 400  # per round
    rounds: int = 15
    batch: int = 2
    channels: int = 8
    groups: int = 4
    size: int = 4
    intra_op_threads: int = 1

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _best_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def _cases(cfg: OverheadConfig, device: torch.device):
    x = torch.randn(cfg.batch, cfg.channels, cfg.size, cfg.size, device=device)
    w = torch.randn(cfg.channels, cfg.channels // cfg.groups, 3, 3, device=device)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    conv = dict(stride=1, padding=1, groups=cfg.groups)

    def stock_stats():
        y = F.conv2d(x, w, **conv)
        return y, torch.var_mean(y, (0, 2, 3), correction=0)

    def train(conv_fn):
        def step():
            conv_fn(xg, wg, **conv).sum().backward()
        return step

    return [
        ("grouped_conv2d", lambda: pk.grouped_conv2d(x, w, **conv), lambda: F.conv2d(x, w, **conv)),
        ("fused_conv2d_stats", lambda: pk.fused_conv2d(x, w, **conv, channel_stats=True), stock_stats),
        ("grouped_conv2d_train", train(pk.grouped_conv2d), train(F.conv2d)),
    ]


def run(cfg: OverheadConfig, device: torch.device, names: Optional[List[str]] = None) -> List[Dict[str, object]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.intra_op_threads)
    try:
        return _run(cfg, device, names)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: OverheadConfig, device: torch.device, names: Optional[List[str]]) -> List[Dict[str, object]]:
    rows = []
    for name, ours, baseline in _cases(cfg, device):
        if names and name not in names:
            continue
        for fn in (ours, baseline):  # warm: caches filled, kernels compiled
            for _ in range(20):
                fn()
        best_ours = best_base = float("inf")
        for _ in range(cfg.rounds):  # interleaved, so drift hits both alike
            best_ours = min(best_ours, _best_per_call(ours, cfg.calls, device))
            best_base = min(best_base, _best_per_call(baseline, cfg.calls, device))
        extra = (best_ours - best_base) * 1e6
        target = TARGETS_US.get(name)
        rows.append({"case": name, "ours_us": best_ours * 1e6, "torch_us": best_base * 1e6,
                     "extra_us": extra, "target_us": target,
                     "meets_target": None if target is None else extra <= target})
    return rows


def format_rows(rows: List[Dict[str, object]], label: str, cfg: OverheadConfig) -> str:
    n = cfg.intra_op_threads
    threads = "one intra-op thread" if n == 1 else f"{n} intra-op threads"
    lines = [f"host overhead per call on {label}, torch on {threads} (best of rounds, measured)",
             f"{'case':24} {'ours us':>9} {'torch us':>9} {'extra us':>9}  target"]
    for r in rows:
        target = "" if r["target_us"] is None else (
            f"<= {r['target_us']:.0f}: " + ("met" if r["meets_target"] else "NOT met"))
        lines.append(f"{r['case']:24} {r['ours_us']:9.1f} {r['torch_us']:9.1f} {r['extra_us']:9.1f}  {target}")
    return "\n".join(lines)
