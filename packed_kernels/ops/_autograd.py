"""Helpers shared by the custom ops' autograd registrations."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor


def unaliased(outputs: Sequence[Optional[Tensor]], inputs: Sequence[Optional[Tensor]], empty_like: Tensor) -> tuple:
    """Custom-op outputs may not alias inputs or each other: copy those that do, and stand an
    empty tensor in for None (a custom op cannot return None)."""
    seen = {t.data_ptr() for t in inputs if t is not None and t.numel() > 0}
    result = []
    for t in outputs:
        if t is None:
            t = empty_like.new_zeros(0)
        elif t.numel() > 0 and t.data_ptr() in seen:
            t = t.clone()
        if t.numel() > 0:
            seen.add(t.data_ptr())
        result.append(t)
    return tuple(result)
