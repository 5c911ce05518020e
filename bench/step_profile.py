# SPDX-License-Identifier: Apache-2.0
"""Where a speed-table step spends its time: one training step and one inference step of a
row under torch.profiler, per kernel (GPU time, launches) and in total (GPU-busy time vs the
step's wall time: a step far longer than its kernels is bound by the host).

    python -m bench profile --rows pe241-stock,pe241-packed_kernels --ours-backend triton
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

import packed_kernels as pk

from . import models as zoo_rows
from . import records
from .env import device_label
from .table import TableConfig, _autocast, _memory_format, device_batches


@dataclass
class ProfileConfig:
    batch: int = 128
    precision: str = "fp16"
    layout: str = "channels_last"
    arch: int = 50
    warmup: int = 3
    top: int = 15
    python_top: int = 0  # > 0: also the step's top Python functions by own time (cProfile)
    ours_backend: str = "auto"

    def as_dict(self) -> Dict[str, object]:
        return records.config_dict(self)


def _kernel_table(prof, steps: int) -> Dict[str, object]:
    """Per-kernel GPU time per step, from the profiler's device-side events."""
    kernels: Dict[str, List[float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels.setdefault(event.name, []).append(event.time_range.elapsed_us())
    rows = [{"kernel": name, "us_per_step": sum(times) / steps, "launches_per_step": len(times) / steps}
            for name, times in kernels.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"kernels": rows, "gpu_us_per_step": sum(r["us_per_step"] for r in rows),
            "launches_per_step": sum(r["launches_per_step"] for r in rows)}


def row_steps(key: str, cfg: ProfileConfig, device: torch.device):
    """(model, train_step, infer_step) of a speed-table row, as the table runs them."""
    row = zoo_rows.parse_row(key)
    table_cfg = TableConfig(batch=cfg.batch, arch=cfg.arch, layout=cfg.layout)
    model, m, _ = zoo_rows.build_model(row, arch=cfg.arch, num_classes=table_cfg.num_classes,
                                       ours_backend=cfg.ours_backend)
    model = model.to(device, memory_format=_memory_format(cfg.layout))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
    x, y = device_batches(table_cfg, cfg.batch, device, 1)[0]
    ensemble_backend = "torch" if row.impl == "stock" else None

    def train_step():
        inputs, targets = zoo_rows.training_batch(row, x, y, m)
        with _autocast(device, cfg.precision):
            loss = F.cross_entropy(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer_step():
        with torch.inference_mode(), _autocast(device, cfg.precision), pk.nn.reuse_inference_operands():
            return pk.ensemble_mean(model(x), m, backend=ensemble_backend)

    return model, train_step, infer_step


def profile_row(key: str, cfg: ProfileConfig, device: torch.device) -> Dict[str, object]:
    from torch.profiler import ProfilerActivity, profile
    model, train_step, infer_step = row_steps(key, cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the speed table times the cuDNN side
    out = {"row": key, "device": device_label(device)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for phase, step, mode in (("train", train_step, model.train), ("infer", infer_step, model.eval)):
        mode()
        for _ in range(cfg.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        table = _kernel_table(prof, 1)
        table["wall_us_per_step"] = wall_us
        if cfg.python_top:
            table["python"] = _python_profile(step, device, cfg.python_top)
        out[phase] = table
    return out


def _python_profile(step, device: torch.device, top: int) -> List[Dict[str, object]]:
    """The host side of one step: the functions with the most own time (cProfile)."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = [{"function": f"{path.split('site-packages/')[-1]}:{line}({name})", "calls": calls,
             "own_us": own * 1e6, "cumulative_us": cumulative * 1e6}
            for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items()]
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:top]


def format_profiles(profiles: Sequence[Dict[str, object]], cfg: ProfileConfig) -> str:
    lines = []
    for p in profiles:
        for phase in ("train", "infer"):
            t = p[phase]
            lines.append(f"== {p['row']} {phase} ({cfg.precision}, {cfg.layout}, batch {cfg.batch}, "
                         f"convs: {cfg.ours_backend}): wall {t['wall_us_per_step'] / 1e3:.2f} ms/step, "
                         f"kernels {t['gpu_us_per_step'] / 1e3:.2f} ms in {t['launches_per_step']:.0f} "
                         f"launches — {p['device']}")
            for k in t["kernels"][:cfg.top]:
                lines.append(f"  {k['us_per_step']:9.1f} us {k['launches_per_step']:5.0f}x  {k['kernel'][:110]}")
            if t.get("python"):
                lines.append("  host, one step under cProfile: own us, cumulative us, calls, function")
                for f in t["python"]:
                    lines.append(f"  {f['own_us']:9.0f} {f['cumulative_us']:10.0f} {f['calls']:6d}  "
                                 f"{f['function'][:120]}")
    return "\n".join(lines)
