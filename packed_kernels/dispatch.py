# SPDX-License-Identifier: Apache-2.0
"""Which engine runs a convolution when the caller leaves the choice to the library
(backend=None or "auto" on CUDA tensors).

The first call of each kind — (op, pass, shape class, dtype, layout, GPU, library versions) —
runs every engine usable here (cuDNN through torch, Triton, the CUDA C++ kernels) on its own
inputs, checks each result against cuDNN's, times the ones that agree and keeps the fastest.
An engine that disagrees is never chosen for that kind on this machine, and one warning names
it. Decisions are kept on disk ($PACKED_KERNELS_CACHE_DIR/dispatch.json, default
~/.cache/packed_kernels) and reused by later processes.

PACKED_KERNELS_DISPATCH selects the policy, read at each decision:
  measure  (default) as above;
  static   decisions already cached, else cuDNN; never measures;
  torch    cuDNN everywhere.
Nothing is measured inside a CUDA-graph capture (measuring synchronises): cached decisions or
cuDNN. Under torch.compile the ops receive "auto" and decide when they run, not when traced.
report() lists the decisions and the timings behind them.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import _config

__all__ = ["report", "forget"]  # the user's; the rest serves the conv ops

REFERENCE = "torch"  # cuDNN: the engine every other is checked against, and the static choice


class JsonCache:
    """A dict kept in <PACKED_KERNELS_CACHE_DIR>/<name>.json: loaded on first use, rewritten atomically on each
    put (concurrent processes never read half a file), kept in memory only where the folder is
    not writable. A corrupt or missing file is an empty cache."""

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self._entries: Dict[str, object] = {}
        self._loaded_from: Optional[Path] = None

    def path(self) -> Path:
        return _config.cache_dir() / f"{self.name}.json"

    def _load(self) -> None:
        path = self.path()
        if self._loaded_from == path:
            return
        self._loaded_from, self._entries = path, {}
        try:
            entries = json.loads(path.read_text())
            if isinstance(entries, dict):
                self._entries = entries
        except (OSError, ValueError):
            pass

    def get(self, key: str):
        with self.lock:
            self._load()
            return self._entries.get(key)

    def put(self, key: str, value) -> None:
        with self.lock:
            self._load()
            self._entries[key] = value
            path = self.path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                pass

    def items(self) -> List[tuple]:
        with self.lock:
            self._load()
            return sorted(self._entries.items())

    def clear(self) -> None:
        with self.lock:
            self._entries, self._loaded_from = {}, self.path()
            try:
                self.path().unlink()
            except OSError:
                pass


@dataclass
class Decision:
    engine: str
    source: str  # "measured" (this process), "cache" (disk) or "static"
    timings_us: Dict[str, float] = field(default_factory=dict)
    rejected: Dict[str, str] = field(default_factory=dict)  # engine -> why it was not timed


def _time_us(run: Callable[[], object], warmup: int = 2, calls: int = 8, rounds: int = 3) -> float:
    """Time per call of `run` called back to back (CUDA events around `calls` calls, the best of
    `rounds`), after `warmup` calls: the GPU's time when the GPU is the bottleneck, the host's
    when launching is (eager training is often host-bound: a kernel that saves 5 us of GPU
    time but costs 30 us more to launch is slower there)."""
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Dispatcher:
    """Measured engine choice with a disk cache. `timer(run)` returns microseconds per call;
    `agree(result, reference)` returns None or why `result` is not cuDNN's `reference`."""

    def __init__(self, cache: JsonCache, timer: Callable[[Callable[[], object]], float] = _time_us,
                 capturing: Callable[[], bool] = _capturing):
        self.cache, self.timer, self.capturing = cache, timer, capturing
        self._decisions: Dict[tuple, Decision] = {}
        self._warned: set = set()

    def choose(self, key: tuple, engines: Sequence[str], trial: Callable[[str], object],
               agree: Callable[[object, object], Optional[str]]) -> str:
        decision = self._decisions.get(key)
        if decision is not None:
            return decision.engine
        policy = _config.dispatch_mode()
        if policy == "torch" or len(engines) < 2:
            return REFERENCE
        text_key = "|".join(map(str, key))
        cached = self.cache.get(text_key)
        if isinstance(cached, dict) and cached.get("engine") in engines:
            decision = Decision(cached["engine"], "cache", cached.get("timings_us", {}),
                                cached.get("rejected", {}))
        elif policy == "static" or self.capturing():
            return REFERENCE  # not remembered: a later call outside the capture measures
        else:
            decision = self._measure(text_key, engines, trial, agree)
            self.cache.put(text_key, {"engine": decision.engine, "timings_us": decision.timings_us,
                                      "rejected": decision.rejected})
        self._decisions[key] = decision
        return decision.engine

    def known(self, key: tuple, engines: Sequence[str]) -> str:
        """The decision made or cached for `key`, else cuDNN; never measures (tracing)."""
        decision = self._decisions.get(key)
        if decision is not None:
            return decision.engine
        if _config.dispatch_mode() == "torch":
            return REFERENCE
        cached = self.cache.get("|".join(map(str, key)))
        if isinstance(cached, dict) and cached.get("engine") in engines:
            return cached["engine"]
        return REFERENCE

    def _measure(self, text_key: str, engines: Sequence[str], trial, agree) -> Decision:
        reference = trial(REFERENCE)
        timings = {REFERENCE: self.timer(lambda: trial(REFERENCE))}
        rejected = {}
        for engine in engines:
            if engine == REFERENCE:
                continue
            try:
                reason = agree(trial(engine), reference)
            except Exception as exc:  # an engine that cannot run this call is not a candidate
                reason = f"raised {type(exc).__name__}: {exc}"
            if reason is None:
                timings[engine] = self.timer(lambda: trial(engine))
                continue
            rejected[engine] = reason
            if engine not in self._warned:
                self._warned.add(engine)
                warnings.warn(f"packed_kernels: the {engine!r} engine fails or disagrees with cuDNN ({reason}) "
                              f"on {text_key}; it is not chosen there (PACKED_KERNELS_DISPATCH=torch "
                              f"keeps cuDNN everywhere)", RuntimeWarning, stacklevel=4)
        best = min(timings, key=timings.get)
        return Decision(best, "measured", timings, rejected)

    def report(self) -> List[Dict[str, object]]:
        """Every decision this process made or loaded, and every one on disk."""
        rows = {"|".join(map(str, k)): dict(key="|".join(map(str, k)), **asdict(d))
                for k, d in self._decisions.items()}
        for text_key, value in self.cache.items():
            if text_key not in rows and isinstance(value, dict):
                rows[text_key] = dict(key=text_key, source="cache", **value)
        return [rows[k] for k in sorted(rows)]

    def forget(self) -> None:
        """Drops this process's decisions and the disk cache (everything is measured again)."""
        self._decisions.clear()
        self.cache.clear()


DISPATCHER = Dispatcher(JsonCache("dispatch"))


def report() -> List[Dict[str, object]]:
    """The engine decisions (key, engine, source, timings_us, rejected), sorted by key."""
    return DISPATCHER.report()


def forget() -> None:
    """Forgets every decision, on disk too."""
    DISPATCHER.forget()


# Per dtype, the largest |ours - cuDNN| accepted, relative to max |cuDNN|: above the rounding of
# the output dtype and of TF32 products (cuDNN may use TF32 for float32), far below any indexing
# or masking error (which is O(1) relative).
AGREEMENT = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-6}


def agree(result, reference) -> Optional[str]:
    """None when `result` matches cuDNN's `reference` (a tensor or a sequence of tensors / None):
    the same non-finite positions and values, finite values within AGREEMENT."""
    if isinstance(reference, torch.Tensor):
        result, reference = (result,), (reference,)
    for got, want in zip(result, reference):
        if want is None or got is None:
            if (want is None) != (got is None):
                return "a missing output"
            continue
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"shape/dtype {tuple(got.shape)}/{got.dtype} instead of {tuple(want.shape)}/{want.dtype}"
        finite, infinite = torch.isfinite(want), torch.isinf(want)
        if not (torch.equal(torch.isnan(want), torch.isnan(got))
                and torch.equal(infinite, torch.isinf(got))
                and torch.equal(want[infinite], got[infinite])):
            return "different non-finite values"
        if want.numel() == 0:
            continue
        want64, got64 = want.double().masked_fill(~finite, 0), got.double().masked_fill(~finite, 0)
        scale = want64.abs().max().item()
        error = (got64 - want64).abs().max().item()
        tolerance = AGREEMENT[want.dtype] * max(scale, 1e-30)
        if error > tolerance:
            return f"max error {error:.3g} > {tolerance:.3g}"
    return None
