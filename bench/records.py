# SPDX-License-Identifier: Apache-2.0
"""JSON records under bench/results/: one file per run of a benchmark, with its environment.

Layout: bench/results/<date>-<device>/<kind>-<time>.json. CPU smoke runs go to
bench/results/tmp/ (git-ignored) unless the caller asks to record them.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from .env import device_slug, environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_DIR = RESULTS_DIR / "tmp"
SCHEMA = 1
KINDS = ("table", "conv", "ensemble", "bn", "profile", "overhead", "dispatch")


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def run_dir(device, *, record: Optional[bool] = None, base: Optional[Path] = None) -> Path:
    """Where this run's records go: results/<date>-<device>/ on a GPU (or when `record`),
    results/tmp/<date>-cpu/ for CPU smoke runs."""
    device = torch.device(device)
    if record is None:
        record = device.type == "cuda"
    root = Path(base) if base is not None else (RESULTS_DIR if record else SMOKE_DIR)
    return root / f"{now_utc():%Y-%m-%d}-{device_slug(device)}"


def config_dict(config) -> Dict[str, object]:
    """A benchmark config's fields for its record, tuples as lists (as JSON reads them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}


def make_record(kind: str, device, config: Dict[str, object], rows: List[Dict[str, object]],
                extra: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    if kind not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
    record = {"schema": SCHEMA, "kind": kind, "created": now_utc().isoformat(timespec="seconds"),
              "env": environment(device), "config": config, "rows": rows}
    if extra:
        record.update(extra)
    return record


def write_record(record: Dict[str, object], directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = record["created"].replace(":", "").replace("-", "")[:15]
    path = directory / f"{record['kind']}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"{record['kind']}-{stamp}-{n}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path


def load_records(paths: Iterable[Path]) -> List[Dict[str, object]]:
    """Records from files and folders (searched recursively for *.json), oldest first."""
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no record file or folder at {p}")
    records = []
    for f in files:
        data = json.loads(f.read_text())
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("kind") not in KINDS:
            continue  # other JSON (e.g. pytest-benchmark output) lives beside records
        data["_path"] = str(f)
        records.append(data)
    return sorted(records, key=lambda r: r.get("created", ""))
