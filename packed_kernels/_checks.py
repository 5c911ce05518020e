# SPDX-License-Identifier: Apache-2.0
"""Input validation shared by every op: runs in Python, before any kernel is launched."""

from __future__ import annotations

import warnings

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


def _compiled_call_signature():
    """packed_kernels._host.call_signature (csrc/host/call_signature.cpp): signature_of's
    distinctions in one C call, bytes or None where only signature_of can key the call; None
    where the extension is not built."""
    try:
        from . import _host
    except ImportError as exc:
        if "undefined symbol" in str(exc):  # compiled against another torch's C++ ABI
            warnings.warn(f"packed_kernels._host does not match this torch ({exc}); the ops key "
                          "their calls in Python (reinstall packed_kernels against this torch)",
                          RuntimeWarning, stacklevel=2)
        return None
    return _host.call_signature


compiled_call_signature = _compiled_call_signature()


class ValidatedCalls:
    """Signatures of calls that passed an op's validation, with what it returned: a repeated
    call (the same shapes, dtypes, devices and arguments) skips the Python checks. An op looks
    a call up in `entries` itself, under compiled_call_signature's key of its arguments (eager
    calls; dynamo cannot trace a C function) or else `signature`'s, and calls `check` on a miss."""

    def __init__(self, validate, signature, max_entries: int = 4096):
        """signature(*args): the call's key, as signature_of's of the arguments would
        distinguish calls (written out per op: the per-argument calls cost its hot path)."""
        self.validate, self.signature, self.max_entries = validate, signature, max_entries
        self.entries: dict = {}

    def check(self, key, *args):
        """validate(*args), raising for a bad call, remembered under `key` (None: under
        signature(*args), unless the arguments are unhashable or not tensors)."""
        result = self.validate(*args)
        if key is None:
            try:
                key = self.signature(*args)
                hash(key)
            except (TypeError, AttributeError):
                return result
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key] = result
        return result
