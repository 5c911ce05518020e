# SPDX-License-Identifier: Apache-2.0
"""Conventions every op and kernel shares, in one place."""

from __future__ import annotations

from typing import Optional

import torch

ACTIVATIONS = (None, "relu")  # what `activation=` arguments accept
ACTIVATION_CODES = {None: 0, "relu": 1}  # the kernels' activation constant (Triton and CUDA C++)


def check_activation(op: str, name: str, value) -> None:
    """`activation=` arguments: None (no activation) or "relu", everywhere, op schemas included."""
    if value not in ACTIVATIONS:
        raise ValueError(f"{op}: {name} must be one of {ACTIVATIONS}, got {value!r}")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, sums and per-channel gradients are float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp32_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel vectors go to the kernels dense and float32, whatever the activations' dtype."""
    return None if t is None else t.to(torch.float32).contiguous()
