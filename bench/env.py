# SPDX-License-Identifier: Apache-2.0
"""What a measurement ran on: device, driver, library versions and commit, for every record."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """Short name printed on every output line, e.g. 'cuda:NVIDIA H100 80GB HBM3' or
    'cpu:AMD EPYC x2 threads' - so no number is ever read without its device."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_name()} x{torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    """File-system-safe device name for result folders (e.g. 'nvidia-h100-80gb-hbm3', 'cpu')."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


@functools.lru_cache(maxsize=None)
def git_commit() -> Dict[str, object]:
    sha = _run(["git", "rev-parse", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": sha, "dirty": bool(dirty) if dirty is not None else None}


def _driver_version() -> Optional[str]:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def environment(device: torch.device) -> Dict[str, object]:
    """The record header: everything needed to say where and with what a number was measured."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # the CPU path runs without Triton
        triton_version = None
    info: Dict[str, object] = {
        "device_type": device.type,
        "device": device_label(device),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": props.name,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "driver": _driver_version(),
        })
    else:
        info.update({"gpu": None, "driver": None})
    return info
