# SPDX-License-Identifier: Apache-2.0
"""Memory layouts: the format an output keeps (that of its input), and how each kernel backend
reads a conv weight (C_out, C_in/groups, KH, KW): the permutation of it that the launchers make
contiguous (a weight already strided that way costs them no copy)."""

from __future__ import annotations

import torch


def format_of(t: torch.Tensor):
    """The memory format an output derived from `t` keeps: channels_last iff `t` is."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def with_format_of(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """y in format_of(t), copied only where it is not already (an NCHW `t`, the common case,
    costs two flag reads)."""
    if t.is_contiguous():
        return y if y.is_contiguous() else y.contiguous()
    fmt = format_of(t)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


WEIGHT_LAYOUT = {
    "triton": (2, 3, 1, 0),  # (KH, KW, C_in/groups, C_out): C_out contiguous for both GEMMs' tiles
    "cuda": (0, 2, 3, 1),    # (C_out, KH, KW, C_in/groups): channels_last, as the csrc kernels read
    "simt": (0, 2, 3, 1),
}


def kernel_weight(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """The weight as `backend`'s kernels take it (a copy unless it is strided so already)."""
    return weight.permute(*WEIGHT_LAYOUT[backend]).contiguous()


def strided_for(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """The same (C_out, C_in/groups, KH, KW) values, stored in `backend`'s layout, so that
    kernel_weight() is free; torch's layout (unchanged) for a backend without one."""
    layout = WEIGHT_LAYOUT.get(backend)
    if layout is None:
        return weight
    inverse = sorted(range(len(layout)), key=layout.__getitem__)
    return kernel_weight(weight, backend).permute(*inverse)
