# SPDX-License-Identifier: Apache-2.0
"""Output allocation for the kernel launchers.

Inside `poisoned_outputs()` (the tests run in it) every output starts as NaN, so an element a
kernel forgot to write shows up instead of passing by luck."""

from __future__ import annotations

import contextlib

import torch

_poison = False


def empty(shape, like: torch.Tensor, dtype=None, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(like: torch.Tensor, memory_format=torch.preserve_format) -> torch.Tensor:
    out = torch.empty_like(like, memory_format=memory_format)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous
