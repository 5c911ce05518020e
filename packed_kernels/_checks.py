# SPDX-License-Identifier: Apache-2.0
"""Input validation shared by every op: runs in Python, before any kernel is launched."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(op: str, name: str, value, *, min_dim: int = 1,
                       allow_empty_batch: bool = False) -> None:
    """A floating-point tensor of at least `min_dim` dimensions with elements (with
    `allow_empty_batch`, a batch of 0 samples of a non-empty shape passes, as torch's ops take it)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor "
                        f"(float32, float16, bfloat16 or float64), got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimensions, got shape "
                         f"{tuple(value.shape)}")
    if value.numel() == 0 and not (allow_empty_batch and value.shape[0] == 0
                                   and all(size > 0 for size in value.shape[1:])):
        raise ValueError(f"{op}: {name} is empty (shape {tuple(value.shape)})")


def check_same_device_dtype(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in `others` (None entries are skipped) matches `reference`'s device and dtype."""
    for name, value in others.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(value).__name__}")
        if value.device != reference.device:
            raise ValueError(f"{op}: {name} is on {value.device} but {reference_name} is on "
                             f"{reference.device}; move them to one device")
        if value.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} has dtype {value.dtype} but {reference_name} has "
                            f"{reference.dtype}; mixed dtypes are not supported")


def check_positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {value}")
    return value


def signature_of(value):
    """What validation reads of an argument: a tensor's type, shape, dtype and device; a
    scalar's exact type and value (2.0 and True must not pass for 2 and 1); sequences itemwise."""
    if value is None:
        return None
    cls = value.__class__
    if cls is int or cls is str or cls is bool:
        return cls, value
    if isinstance(value, torch.Tensor):
        return cls, value.shape, value.dtype, value.device
    if cls is tuple or cls is list:
        return (cls, *map(signature_of, value))
    hash(value)  # unhashable: not cached
    return cls, value


class ValidatedCalls:
    """Signatures of calls that passed an op's validation, with what it returned: a repeated
    call (the same shapes, dtypes, devices and arguments) skips the Python checks."""

    def __init__(self, validate, max_entries: int = 4096, signature=None):
        """signature(*args): the call's key, as signature_of's of the arguments would
        distinguish calls (an op's own, written out, saves the per-argument calls on its hot
        path); by default the tuple of signature_of's."""
        self.validate, self.max_entries = validate, max_entries
        self.signature = signature or (lambda *args: tuple(map(signature_of, args)))
        self.entries: dict = {}

    def __call__(self, *args):
        try:
            return self.entries[self.signature(*args)]
        except (KeyError, TypeError, AttributeError):  # new, unhashable or not tensors
            pass
        result = self.validate(*args)
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        try:
            self.entries[self.signature(*args)] = result
        except (TypeError, AttributeError):
            pass
        return result
