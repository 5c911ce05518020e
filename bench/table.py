# SPDX-License-Identifier: Apache-2.0
"""The paper's speed table: training s/epoch and inference images/s per model, implementation
and precision, with peak training memory, printed beside the paper's figures as ratios to the
single model on stock PyTorch.

Training step = forward, cross-entropy on the estimator-major logits against targets repeated
M times, backward and an SGD step (GradScaler under fp16). s/epoch = median step time x
ceil(images / batch). Inference = forward + the ensemble's mean prediction.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

import packed_kernels as pk

from . import models as zoo_rows
from . import records
from .env import device_label
from .models import MODELS, PAPER, Row
from .timing import measure

PRECISIONS = ("fp32", "fp16")
LAYOUTS = ("nchw", "channels_last")


@dataclass
class TableConfig:
    batch: int = 128
    infer_batch: Optional[int] = None   # None: same as batch
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 100
    epoch_images: int = 50_000
    arch: int = 50
    precisions: Sequence[str] = PRECISIONS
    layout: str = "nchw"
    warmup: int = 10
    reps: int = 30
    max_seconds: Optional[float] = 20.0  # cap on each timed phase
    dataloader: bool = False
    loader_workers: int = 4
    lr: float = 0.05
    ours_backend: str = "auto"  # engine of the packed_kernels rows' layers (models.build_model)

    def as_dict(self) -> Dict[str, object]:
        d = records.config_dict(self)
        d["infer_batch"] = self.infer_batch or self.batch
        return d


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16)


def _memory_format(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


class SyntheticImages(torch.utils.data.Dataset):
    """CIFAR-sized uint8 images made up on the host, with CIFAR's train augmentation (random
    crop with 4-pixel padding, horizontal flip) and normalization done per item in the
    workers - the host work a real loader does, without a data set on disk."""

    def __init__(self, n: int, image_size: int, channels: int, num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, channels, image_size, image_size), dtype=torch.uint8,
                                    generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].float().div_(255)
        size = img.shape[-1]
        padded = F.pad(img, (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        img = padded[:, top:top + size, left:left + size]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img - 0.5) / 0.25, self.labels[i]


def device_batches(cfg: TableConfig, batch: int, device: torch.device, count: int):
    fmt = _memory_format(cfg.layout)
    out = []
    for _ in range(count):
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
        out.append((x.contiguous(memory_format=fmt),
                    torch.randint(0, cfg.num_classes, (batch,), device=device)))
    return out


def loader_batches(cfg: TableConfig, device: torch.device) -> Callable[[int], tuple]:
    """fn(i) -> the next (x, y) from a real DataLoader (pinned, non-blocking copies)."""
    n = min(cfg.epoch_images, cfg.batch * (cfg.warmup + cfg.reps + 2))
    loader = torch.utils.data.DataLoader(
        SyntheticImages(n, cfg.image_size, cfg.in_channels, cfg.num_classes), batch_size=cfg.batch,
        shuffle=True, drop_last=True, num_workers=cfg.loader_workers,
        pin_memory=device.type == "cuda", persistent_workers=cfg.loader_workers > 0)
    fmt = _memory_format(cfg.layout)
    state: Dict[str, Iterator] = {"it": iter(loader)}

    def next_batch(i: int):
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            x, y = next(state["it"])
        return (x.to(device, non_blocking=True).contiguous(memory_format=fmt),
                y.to(device, non_blocking=True))
    return next_batch


def _peak_memory(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_row(row: Row, precision: str, cfg: TableConfig, device: torch.device,
                ) -> Dict[str, object]:
    """Train and inference timings for one row at one precision (a fresh model each time)."""
    _reset_memory(device)
    model, m, source = zoo_rows.build_model(row, arch=cfg.arch, in_channels=cfg.in_channels,
                                            num_classes=cfg.num_classes, ours_backend=cfg.ours_backend)
    model = model.to(device, memory_format=_memory_format(cfg.layout))
    params = sum(p.numel() for p in model.parameters())
    runner = torch.compile(model) if row.compiled else model
    ensemble_backend = "torch" if row.impl == "stock" else None
    amp = precision == "fp16"

    # -- training ------------------------------------------------------------------------
    runner.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    if cfg.dataloader:
        fetch = loader_batches(cfg, device)
    else:
        batches = device_batches(cfg, cfg.batch, device, 4)
        fetch = lambda i: batches[i % len(batches)]  # noqa: E731

    def train_step(i: int):
        x, y = zoo_rows.training_batch(row, *fetch(i), m)
        with _autocast(device, precision):
            logits = runner(x)
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    _reset_memory(device)
    train = measure(train_step, device, warmup=cfg.warmup, reps=cfg.reps, max_seconds=cfg.max_seconds)
    peak = _peak_memory(device)
    steps = math.ceil(cfg.epoch_images / cfg.batch)
    epoch = train.scaled(steps)
    del opt, scaler, fetch
    if not cfg.dataloader:
        del batches

    # -- inference -----------------------------------------------------------------------
    runner.eval()
    infer_batch = cfg.infer_batch or cfg.batch
    inputs = device_batches(cfg, infer_batch, device, 4)

    def infer_step(i: int):
        with torch.inference_mode(), _autocast(device, precision):
            logits = runner(inputs[i % len(inputs)][0])
            return pk.ensemble_mean(logits, m, backend=ensemble_backend)

    _reset_memory(device)
    # an evaluation loop as the library documents it: the folded BN and the kernels' weights
    # are kept between batches (stock modules have nothing of the kind to keep)
    with pk.nn.reuse_inference_operands():
        infer = measure(infer_step, device, warmup=cfg.warmup, reps=cfg.reps, max_seconds=cfg.max_seconds)
    infer_peak = _peak_memory(device)
    del model, runner, inputs
    _reset_memory(device)
    return {
        "row": row.key, "model": row.model, "name": MODELS[row.model].name, "impl": row.impl,
        "compiled": row.compiled, "precision": precision, "layout": cfg.layout,
        "batch": cfg.batch, "infer_batch": infer_batch, "num_estimators": m, "params": params,
        "source": source, "device": device_label(device),
        "train_step": train.as_dict(), "train_epoch": epoch.as_dict(), "steps_per_epoch": steps,
        "train_images_per_s": train.rate(cfg.batch),
        "infer_batch_time": infer.as_dict(), "infer_images_per_s": infer.rate(infer_batch),
        "peak_train_bytes": peak, "peak_infer_bytes": infer_peak,
        "dataloader": cfg.dataloader,
        "ours_backend": cfg.ours_backend if row.impl == "packed_kernels" else None,
    }


def run_table(rows: Sequence[Row], cfg: TableConfig, device: torch.device,
              progress: bool = True) -> List[Dict[str, object]]:
    from tqdm import tqdm
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN picks its best algorithm for the stock side
    results = []
    jobs = [(row, p) for p in cfg.precisions for row in rows]
    bar = tqdm(jobs, desc=f"speed table [{device_label(device)}]", disable=not progress,
               unit="row", leave=False)
    for row, precision in bar:
        bar.set_postfix_str(f"{row.label} {precision}")
        try:
            results.append(measure_row(row, precision, cfg, device))
        except KeyboardInterrupt:  # a time limit (SIGINT): keep the rows measured so far
            _reset_memory(device)
            break
        except Exception as exc:  # a row that cannot run says why; the others still run
            results.append({"row": row.key, "model": row.model, "name": MODELS[row.model].name,
                            "impl": row.impl, "compiled": row.compiled, "precision": precision,
                            "layout": cfg.layout, "batch": cfg.batch,
                            "device": device_label(device),
                            "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
            _reset_memory(device)
    return results


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------

def _reference(results: List[Dict[str, object]], precision: str) -> Optional[Dict[str, object]]:
    for r in results:
        if (r["model"] == "single" and r["impl"] == "stock" and not r["compiled"]
                and r["precision"] == precision and "error" not in r):
            return r
    return None


def paper_ratios(model: str, precision: str):
    """(training speed, inference speed) of the paper's row relative to its single model."""
    table = PAPER.get(precision, {})
    if model not in table:
        return None, None
    single_epoch, single_ips = table["single"]
    epoch, ips = table[model]
    return single_epoch / epoch, ips / single_ips


def ratios(row: Dict[str, object], ref: Optional[Dict[str, object]]) -> Dict[str, Optional[float]]:
    """Speed and memory of a row relative to the stock single model at the same precision."""
    if ref is None or "error" in row:
        return {"train": None, "infer": None, "memory": None}
    mem = None
    if row.get("peak_train_bytes") and ref.get("peak_train_bytes"):
        mem = row["peak_train_bytes"] / ref["peak_train_bytes"]
    return {"train": ref["train_epoch"]["median"] / row["train_epoch"]["median"],
            "infer": row["infer_images_per_s"]["median"] / ref["infer_images_per_s"]["median"],
            "memory": mem}


def row_label(r: Dict[str, object]) -> str:
    """The row's name, with the forced conv backend of packed_kernels rows when not auto."""
    label = zoo_rows.parse_row(r["row"]).label
    forced = r.get("ours_backend")
    return label[:-1] + f", {forced} convs]" if forced not in (None, "auto") else label


def _x(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2f}×"


def format_table(results: List[Dict[str, object]], cfg: Dict[str, object], source: str) -> str:
    """The table as text, one block per precision; every line names the device."""
    lines = []
    for precision in dict.fromkeys(r["precision"] for r in results):
        rows = [r for r in results if r["precision"] == precision]
        ref = _reference(results, precision)
        device = rows[0]["device"]
        cpu = device.startswith("cpu")
        lines.append(
            f"== {precision}{' autocast' if precision == 'fp16' else ''}, batch {cfg['batch']}, "
            f"{cfg['layout']}, {cfg['image_size']}x{cfg['image_size']}, {cfg['num_classes']} classes, "
            f"models: {source} — {device}" + ("  [CPU NUMBERS: not comparable to the paper's GPU]" if cpu else ""))
        header = (f"{'model':34} {'train s/epoch [q1-q3]':>27} {'×single':>8} {'paper×':>7} "
                  f"{'infer im/s [q1-q3]':>26} {'×single':>8} {'paper×':>7} {'peak MiB':>9} "
                  f"{'×single':>8}  device")
        lines.append(header)
        for r in rows:
            label = row_label(r)
            if "error" in r:
                lines.append(f"{label:34} failed: {r['error']}  {r['device']}")
                continue
            q = ratios(r, ref)
            p_train, p_infer = paper_ratios(r["model"], precision)
            e, ips = r["train_epoch"], r["infer_images_per_s"]
            mem = r.get("peak_train_bytes")
            lines.append(
                f"{label:34} {e['median']:9.2f} [{e['q1']:7.2f}-{e['q3']:7.2f}] {_x(q['train']):>8} "
                f"{_x(p_train):>7} {ips['median']:8.1f} [{ips['q1']:7.1f}-{ips['q3']:7.1f}] "
                f"{_x(q['infer']):>8} {_x(p_infer):>7} "
                f"{'—' if mem is None else f'{mem / 2**20:.0f}':>9} {_x(q['memory']):>8}  {r['device']}")
        lines.append("")
    lines.extend(format_targets(results))
    return "\n".join(lines)


# The project's goals (docs/benchmarks.md#targets), checked against the rows they name; GPU runs only mean them.
TARGETS = (
    ("PE-(2,4,1) ours inference vs single stock, fp16", "pe241-packed_kernels", "infer", 1.0, "single"),
    ("PE-(2,4,1) ours training vs single stock, fp16", "pe241-packed_kernels", "train", 0.8, "single"),
    ("PE-(2,4,2) ours inference vs single stock, fp16", "pe242-packed_kernels", "infer", 1.1, "single"),
    ("PE-(2,4,1) ours vs PE-(2,4,1) stock inference, fp16", "pe241-packed_kernels", "infer", 1.7, "pe241-stock"),
    ("PE-(2,4,1) ours vs PE-(2,4,1) stock training, fp16", "pe241-packed_kernels", "train", 1.6, "pe241-stock"),
    ("PE-(2,4,1) ours peak training memory vs single stock, fp16", "pe241-packed_kernels", "memory", 1.5, "single"),
)


def target_checks(results: List[Dict[str, object]], precision: str = "fp16") -> List[Dict[str, object]]:
    if any(r["device"].startswith("cpu") for r in results):
        return []  # the targets are GPU goals
    by_key = {r["row"]: r for r in results if r["precision"] == precision and "error" not in r}
    by_key.setdefault("single", by_key.get("single-stock"))
    checks = []
    for text, key, what, goal, ref_key in TARGETS:
        row, ref = by_key.get(key), by_key.get(ref_key if ref_key != "single" else "single-stock")
        if row is None or ref is None:
            continue
        value = ratios(row, ref)[what]
        if value is None:
            continue
        met = value <= goal if what == "memory" else value >= goal
        checks.append({"target": text, "value": value, "goal": goal,
                       "op": "<=" if what == "memory" else ">=", "met": met, "device": row["device"]})
    return checks


def format_targets(results: List[Dict[str, object]]) -> List[str]:
    if results and all(r["device"].startswith("cpu") for r in results):
        return ["Targets are GPU goals: not evaluated on CPU numbers."]
    checks = target_checks(results)
    if not checks:
        return []
    lines = ["Targets (project goals, meaningful on a GPU):"]
    for c in checks:
        status = "met" if c["met"] else "not met"
        lines.append(f"  {c['target']}: {c['value']:.2f}× (goal {c['op']} {c['goal']}×) {status}  {c['device']}")
    return lines
