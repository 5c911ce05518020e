# SPDX-License-Identifier: Apache-2.0
"""Backend choice: one place that knows which engines exist and which can run a given call.

Backends:
  torch  - the reference semantics in plain PyTorch (any device, any float dtype)
  triton - Triton kernels (CUDA GPUs; on the CPU only under TRITON_INTERPRET=1)
  cuda   - hand-written CUDA C++ kernels from packed_kernels._C
  simt   - the same CUDA C++ kernels compiled for the CPU against the SIMT emulator
"""

from __future__ import annotations

import importlib
import inspect
import os
from functools import lru_cache, wraps
from typing import Iterable, Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "simt")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call on this machine; the message says why."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any failure means "not usable", the message says which
        return f"{type(exc).__name__}: {exc}"
    return None


def extension(name: str):
    """The compiled extension packed_kernels.<name> ("_C" or "_simt"); raises if unbuilt."""
    module = f"packed_kernels.{name}"
    error = _import_error(module)
    if error is not None:
        hint = {
            "_C": "build it with nvcc present (CUDA_HOME=/usr/local/cuda pip install "
            "--no-build-isolation -e .), and without PACKED_KERNELS_NO_CUDA=1",
            "_simt": "build it with a C++17 compiler (pip install --no-build-isolation -e .), "
            "and without PACKED_KERNELS_NO_SIMT=1",
        }.get(name, "rebuild the package")
        if "undefined symbol" in error:  # torch's C++ ABI differs between its minor versions
            hint = (f"it was compiled against another torch than this one ({torch.__version__}): "
                    "reinstall packed_kernels against it (pip install --no-build-isolation)")
        raise BackendUnavailableError(f"{module} is not importable ({error}); {hint}")
    return importlib.import_module(module)


# Evaluated once at trace time under torch.compile: availability is a property of the machine.
@torch.compiler.assume_constant_result
def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when `backend` can run on tensors of this device and dtype, else why not."""
    if backend == "torch":
        return None
    if dtype not in KERNEL_DTYPES:
        return f"backend {backend!r} supports float32/float16/bfloat16, got {dtype}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available here (no GPU, or no driver)"
    if backend == "triton":
        error = _import_error("triton")
        if error is not None:
            return f"triton is not importable ({error})"
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)
            return None if major >= 8 else "the Triton kernels need compute capability >= 8.0"
        if device.type == "cpu":
            if triton_interpreter_enabled():
                return None
            return ("Triton kernels need a CUDA tensor; on the CPU set TRITON_INTERPRET=1 "
                    "before importing packed_kernels to run them under Triton's interpreter")
        return f"the Triton kernels do not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got a {device.type} tensor"
        error = _import_error("packed_kernels._C")
        return None if error is None else f"packed_kernels._C is not built ({error})"
    if backend == "simt":
        if device.type != "cpu":
            return f"backend 'simt' runs the CUDA kernels on the CPU and needs CPU tensors, got {device.type}"
        error = _import_error("packed_kernels._simt")
        return None if error is None else f"packed_kernels._simt is not built ({error})"
    return f"unknown backend {backend!r}"


@lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# Machine properties, looked up once per device: constants under torch.compile too (a name
# query is no tensor op, and dynamo cannot trace it).
@torch.compiler.assume_constant_result
def device_name(device: torch.device) -> str:
    """The GPU's name for CUDA devices, else the device type."""
    device = torch.device(device)
    return _cuda_properties(_index(device)).name if device.type == "cuda" else device.type


@torch.compiler.assume_constant_result
def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count; 4 elsewhere (the interpreter: few programs keep it fast)."""
    device = torch.device(device)
    return _cuda_properties(_index(device)).multi_processor_count if device.type == "cuda" else 4


def on_input_device(fn):
    """An op implementation run with its first argument's GPU as the current device: Triton
    launches on the current device, whatever device the tensors are on."""
    @wraps(fn)
    def run(*args, **kwargs):
        first = args[0]
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    # custom_op infers the op's schema from the signature: its annotations evaluated in fn's module
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run


def resolve(op: str, requested: Optional[str], device: torch.device, dtype: torch.dtype,
            implemented: Iterable[str], gpu_preference: Iterable[str] = ("triton", "cuda")) -> str:
    """Turn the user's `backend` argument into a concrete backend, or raise a clear error.

    None/"auto" picks the first usable engine of `gpu_preference` for CUDA tensors, and the
    torch reference on the CPU (the interpreter and the emulator are for testing, not speed).
    """
    implemented = tuple(implemented)
    if requested is None or requested == "auto":
        if device.type == "cuda":
            for name in gpu_preference:
                if name in implemented and unavailable_reason(name, device, dtype) is None:
                    return name
        return "torch"
    if not isinstance(requested, str) or requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be None, 'auto' or one of {BACKENDS}, got {requested!r}")
    if requested not in implemented:
        raise BackendUnavailableError(
            f"{op} has no {requested!r} backend yet (implemented: {', '.join(implemented)})")
    reason = unavailable_reason(requested, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: {reason}")
    return requested


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> list:
    """The backends (of BACKENDS: "torch", "triton", "cuda", "simt") that can run calls on
    tensors of this device and dtype here; a name passed as `backend=` that is not in this
    list raises BackendUnavailableError, saying why.

    Args:
        device: a torch.device or its name ("cpu", "cuda", "cuda:1"); the simt backend runs
            on "cpu" tensors, triton and cuda on "cuda" ones.
        dtype: the tensors' dtype; the kernel backends take float32, float16 and bfloat16,
            torch any floating dtype.

    Returns:
        A list of backend names, "torch" always first."""
    return [b for b in BACKENDS if unavailable_reason(b, torch.device(device), dtype) is None]
