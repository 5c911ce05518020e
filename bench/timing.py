# SPDX-License-Identifier: Apache-2.0
"""Timing done one way for every benchmark here.

On a GPU: CUDA events around each call (like triton.testing.do_bench), warm-up calls excluded,
median and quartiles over the timed calls. On the CPU: wall clock with the same statistics.
Callers rotate inputs: `fn(i)` gets the call index and picks inputs[i % len(inputs)], so
repeated calls do not find their data in cache.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass(frozen=True)
class Stats:
    """Seconds per call: median and quartiles over `n` timed calls (warm-up excluded)."""
    median: float
    q1: float
    q3: float
    min: float
    n: int
    clock: str  # "cuda-events" or "wall"

    def scaled(self, factor: float) -> "Stats":
        """The same statistics for `factor` calls (e.g. steps per epoch)."""
        return Stats(self.median * factor, self.q1 * factor, self.q3 * factor, self.min * factor,
                     self.n, self.clock)

    def rate(self, items: float) -> Dict[str, float]:
        """items per second: median and the quartile range (q1 of time is q3 of rate)."""
        return {"median": items / self.median, "q1": items / self.q3, "q3": items / self.q1}

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def summarize(samples, clock: str) -> Stats:
    samples = sorted(float(s) for s in samples)
    if not samples:
        raise ValueError("no timed samples")
    if len(samples) == 1:
        q1 = med = q3 = samples[0]
    else:
        q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Stats(median=med, q1=q1, q3=q3, min=samples[0], n=len(samples), clock=clock)


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[int], object], device, *, warmup: int = 3, reps: int = 20,
            max_seconds: Optional[float] = None, min_reps: int = 3) -> Stats:
    """Time `fn(i)` for i = 0, 1, ...: `warmup` untimed calls, then up to `reps` timed ones.

    `max_seconds` caps the timed phase: the number of timed calls is cut (never below
    `min_reps`) from the warm-up's estimate of one call's time.
    """
    device = torch.device(device)
    if warmup < 0 or reps < 1 or min_reps < 1:
        raise ValueError("measure: need warmup >= 0, reps >= 1, min_reps >= 1")
    on_gpu = device.type == "cuda"
    start = time.perf_counter()
    for i in range(warmup):
        fn(i)
    synchronize(device)
    if max_seconds is not None and warmup:
        per_call = (time.perf_counter() - start) / warmup
        reps = max(min(reps, min_reps), min(reps, int(max_seconds / max(per_call, 1e-9))))
    if on_gpu:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for k, (begin, end) in enumerate(events):
            begin.record()
            fn(warmup + k)
            end.record()
        torch.cuda.synchronize(device)
        samples = [begin.elapsed_time(end) / 1e3 for begin, end in events]
        return summarize(samples, "cuda-events")
    samples = []
    for k in range(reps):
        t0 = time.perf_counter()
        fn(warmup + k)
        samples.append(time.perf_counter() - t0)
    return summarize(samples, "wall")


def kernel_time(fn: Callable[[int], object], device, *, calls: int = 3, start: int = 0) -> Optional[float]:
    """Seconds of GPU kernel time per call of `fn` (torch.profiler's device events, summed), or
    None off the GPU. Beside measure()'s events around each call, which also count the host's
    time when the GPU waits for it, this is the kernels' share alone."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(start + i)
        synchronize(device)
    total_us = sum(e.time_range.elapsed_us() for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / calls / 1e6


def rotation_count(bytes_per_input: int, device, *, cache_multiple: float = 3.0,
                   limit: int = 64) -> int:
    """How many distinct input sets to rotate through so their total exceeds the last-level
    cache `cache_multiple` times (L2 on a GPU; 64 MiB assumed on the CPU)."""
    device = torch.device(device)
    cache = 64 * 2**20
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or cache
    needed = int(cache_multiple * cache // max(bytes_per_input, 1)) + 1
    return max(2, min(limit, needed))


def copy_bandwidth(device, *, nbytes: Optional[int] = None, reps: int = 20) -> Dict[str, object]:
    """The card's device-to-device copy bandwidth (read + write bytes / time), measured now so
    bandwidth-bound kernels are judged against this machine in this run. A roof is what the
    card can do, so it comes from the fastest call, not the median."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 64 << 20
    src = [torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_() for _ in range(2)]
    dst = torch.empty_like(src[0])
    stats = measure(lambda i: dst.copy_(src[i % 2]), device, warmup=3, reps=reps)
    moved = 2 * src[0].numel() * src[0].element_size()
    return {"bytes": moved, "time": stats.as_dict(), "gbps": moved / stats.min / 1e9}


def matmul_peak(device, dtype=torch.float16, *, size: Optional[int] = None, reps: int = 20
                ) -> Dict[str, object]:
    """Dense matmul throughput measured now: the compute roof for the roofline plots."""
    device = torch.device(device)
    if size is None:
        size = 8192 if device.type == "cuda" else 512
    a = [torch.randn(size, size, device=device, dtype=dtype) for _ in range(2)]
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = measure(lambda i: a[i % 2] @ b, device, warmup=3, reps=reps)
    flops = 2 * size ** 3
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "time": stats.as_dict(),
            "tflops": flops / stats.min / 1e12}
