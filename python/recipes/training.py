# SPDX-License-Identifier: Apache-2.0
"""The training loop: SGD with the paper's step schedule (or cosine), autocast, channels_last,
DistributedDataParallel, a progress bar, per-epoch checkpoints with resume, JSON-lines metrics.

Resume contract: after every finished epoch the loop appends that epoch's metrics to
metrics.jsonl and then atomically replaces checkpoint.pt (model, optimizer, scheduler, grad
scaler, RNG state). A run killed at any point restarts from the last checkpoint; epochs logged
after it (the kill fell between the two writes) are dropped from metrics.jsonl and redone.
Batch order and augmentation depend only on (seed, epoch), so the resumed run computes what
the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from packed_kernels.nn import repeat_targets

from .data import Dataset, epoch_batches, num_batches
from .errors import RecipeError
from .evaluation import autocast_context, classification_metrics, predict_logits

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    epochs: int = 75
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "step"  # "step" (MultiStepLR) or "cosine"
    milestones: List[int] = field(default_factory=lambda: [25, 50])
    lr_gamma: float = 0.1
    amp: str = "none"  # "none", "bf16", "fp16"
    channels_last: bool = False
    seed: int = 0
    eval_every: int = 1  # evaluate on the test split every this many epochs (and at the end)
    eval_batch_size: int = 256

    # Fields that may change between an interrupted run and its resumption.
    RESUMABLE_CHANGES = ("eval_every", "eval_batch_size")

    def validate(self) -> None:
        if self.epochs < 1:
            raise RecipeError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise RecipeError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecipeError(f"--lr must be a positive number, got {self.lr}")
        if not (0 <= self.weight_decay < math.inf) or not 0 <= self.momentum < 1:
            raise RecipeError("--weight-decay must be a finite number >= 0 and --momentum in [0, 1)")
        if self.schedule not in ("step", "cosine"):
            raise RecipeError(f"--schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise RecipeError(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        if sorted(self.milestones) != list(self.milestones) or any(m < 1 for m in self.milestones):
            raise RecipeError(f"--milestones must be increasing positive epochs, got {self.milestones}")
        if self.eval_every < 1:
            raise RecipeError(f"--eval-every must be >= 1, got {self.eval_every}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1 in the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return Distributed(rank, world_size, local_rank)


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_log(path: str) -> List[dict]:
    """The log's records; a last line cut short by a kill is dropped (the run redoes it)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RecipeError(f"{path!r} line {i + 1} is not a JSON record; fix or delete the file, "
                              f"or pass --fresh") from None
    return records


def _append_log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_log(path: str, last_epoch: int) -> None:
    """Keep the log up to `last_epoch` (the checkpoint's); drop records of redone epochs."""
    kept = [r for r in _read_log(path) if not (r.get("event") == "epoch" and r["epoch"] > last_epoch)]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def _describe_differences(saved: dict, current: dict, ignore=()) -> List[str]:
    return [f"{k}: checkpoint has {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if k not in ignore and saved.get(k) != current.get(k)]


def train(model: nn.Module, dataset: Dataset, cfg: TrainConfig, *, num_estimators: int,
          out_dir: str, model_spec: Optional[dict] = None, device: Optional[torch.device] = None,
          distributed: Optional[Distributed] = None, resume: bool = True, progress: bool = True,
          extra: Optional[dict] = None, batch_transform: Optional[Callable] = None,
          log: Callable[[str], None] = print) -> Dict[str, object]:
    """Train `model` (images -> (M*B, K) estimator-major logits) with cross-entropy against the
    targets repeated M times. Returns the last epoch's record. Rank 0 writes out_dir; `extra`
    is stored in the checkpoint as is (e.g. the data folder, which may move between runs).
    `batch_transform(images, labels, generator) -> (inputs, M*B targets)` replaces the default
    (images as they are, labels repeated M times), e.g. for MIMO's shuffled copies."""
    cfg.validate()
    distributed = distributed or Distributed()
    device = device or torch.device("cpu")
    model_spec = dict(model_spec or {})
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")  # one per process (DDP ranks)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise RecipeError(f"cannot write to {out_dir!r}: {exc.strerror}") from None
    ckpt_path, log_path = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, METRICS)

    torch.manual_seed(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.schedule == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.lr_gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start_epoch = 0
    if resume and os.path.exists(ckpt_path):
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=False)
        except Exception as exc:  # a checkpoint is ours or not; any failure means "not usable"
            raise RecipeError(f"cannot read checkpoint {ckpt_path!r}: {exc}; delete it or pass "
                              f"--fresh") from None
        if not isinstance(state, dict) or not {"config", "model_spec", "model", "epoch"} <= state.keys():
            raise RecipeError(f"{ckpt_path!r} is not a checkpoint written by train.py; use another "
                              f"--out or pass --fresh")
        diffs = (_describe_differences(state["config"], cfg.to_dict(), cfg.RESUMABLE_CHANGES)
                 + _describe_differences(state["model_spec"], model_spec))
        if diffs:
            raise RecipeError(f"{ckpt_path!r} was written by a different run ("
                              + "; ".join(diffs) + "); use another --out or pass --fresh")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # same recorded configuration, other tensors: not ours
            raise RecipeError(f"{ckpt_path!r} holds weights that do not fit this model ("
                              f"{' '.join(str(exc).split())[:240]}); use another --out or pass "
                              f"--fresh") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        if distributed.is_main:
            _truncate_log(log_path, start_epoch)
            _append_log(log_path, {"event": "resume", "from_epoch": start_epoch})
            log(f"resuming from {ckpt_path} after epoch {start_epoch}/{cfg.epochs}")
    elif distributed.is_main:
        if os.path.exists(log_path):
            os.remove(log_path)
        _append_log(log_path, {"event": "start", "config": cfg.to_dict(), "model": model_spec,
                               "world_size": distributed.world_size})

    net: nn.Module = model
    if distributed.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[distributed.local_rank] if device.type == "cuda" else None)

    done = [r for r in _read_log(log_path) if r.get("event") == "epoch"] if distributed.is_main else []
    record: Dict[str, object] = done[-1] if done else {}
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        net.train()
        started = time.time()
        total_loss, total_correct, total_seen = 0.0, 0, 0
        batches = epoch_batches(dataset.train, cfg.batch_size, epoch=epoch, seed=cfg.seed,
                                shuffle=True, augment=dataset.augment, rank=distributed.rank,
                                world_size=distributed.world_size)
        steps = num_batches(len(dataset.train), cfg.batch_size, distributed.world_size)
        bar = None
        if progress and distributed.is_main:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        batch_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + distributed.rank)
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if batch_transform is None:
                inputs, targets = images, repeat_targets(labels, num_estimators)
            else:
                inputs, targets = batch_transform(images, labels, batch_gen)
            if cfg.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, cfg.amp):
                logits = net(inputs)
                loss = nn.functional.cross_entropy(logits.float(), targets)
            if not torch.isfinite(loss):
                raise RecipeError(f"the loss became {loss.item()} at epoch {epoch}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                b = labels.shape[0]
                # Accuracy of every estimator on its own targets (for MIMO they differ).
                total_correct += int((logits.detach().argmax(-1) == targets).sum()) / num_estimators
                total_loss += loss.item() * b
                total_seen += b
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        stats = torch.tensor([total_loss, total_correct, total_seen], dtype=torch.float64, device=device)
        if distributed.world_size > 1:
            dist.all_reduce(stats)
        record = {"event": "epoch", "epoch": epoch, "lr": lr,
                  "train_loss": stats[0].item() / max(stats[2].item(), 1),
                  "train_acc": stats[1].item() / max(stats[2].item(), 1),
                  "time_s": round(time.time() - started, 3)}
        if distributed.is_main:
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                logits = predict_logits(model, dataset.test, num_estimators,
                                        batch_size=cfg.eval_batch_size, device=device,
                                        amp=cfg.amp, channels_last=cfg.channels_last)
                record["test"] = classification_metrics(logits, dataset.test.labels)
            _append_log(log_path, record)
            _atomic_save({"epoch": epoch, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                          "config": cfg.to_dict(), "model_spec": model_spec, **(extra or {})},
                         ckpt_path)
            test = record.get("test")
            log(f"epoch {epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                f"train acc {record['train_acc']:.4f}"
                + (f"  test acc {test['acc']:.4f}  nll {test['nll']:.4f}  ece {test['ece']:.4f}"
                   if test else "") + f"  ({record['time_s']:.1f}s)")
        if distributed.world_size > 1:
            dist.barrier()
    if distributed.is_main and start_epoch < cfg.epochs:
        _append_log(log_path, {"event": "end", "epochs": cfg.epochs})
    return record
