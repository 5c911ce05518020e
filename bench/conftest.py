# SPDX-License-Identifier: Apache-2.0
"""Fixtures for the benchmark suite (pytest bench/ --benchmark-json=...).

On a GPU the cases are the real ones (batch 128, M=4 B=1024 C=1000 fp16, ...); without one the
same cases run shrunk as a quick real smoke run. Every benchmark's extra_info names the device
and commit, so a --benchmark-json file stands on its own."""

import pytest
import torch

from bench.env import default_device, device_label, git_commit

DEVICE = default_device()
ON_GPU = DEVICE.type == "cuda"
# The speed table's models: ResNet-50 on a GPU; on the CPU the smallest CIFAR ResNet of the zoo
# (ResNet-20) so the smoke run fits CI's budget (python -m bench table runs ResNet-50 there).
ARCH = 50 if ON_GPU else 20


def synchronized(fn):
    """Wall-clock timers (pytest-benchmark's) must wait for the GPU to finish."""
    if not ON_GPU:
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def bench_run(benchmark):
    """benchmark.pedantic with the device named; few rounds on the CPU (a smoke run)."""
    def run(fn, *, rounds=None, warmup_rounds=None, **info):
        benchmark.extra_info.update({"device": device_label(DEVICE), **git_commit(), **info})
        return benchmark.pedantic(synchronized(fn), rounds=rounds or (30 if ON_GPU else 3),
                                  warmup_rounds=warmup_rounds if warmup_rounds is not None
                                  else (5 if ON_GPU else 1), iterations=1)
    return run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
