"""The speed table's rows and how each one's model is built.

One place maps a row ("PE-(2,4,1)", impl "stock" or "packed_kernels") to a model from
packed_kernels.models; while the zoo has not landed, to bench.standin (labelled as such).
Every model returns estimator-major logits (M*B, classes).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from packed_kernels.nn import convert

IMPLS = ("stock", "packed_kernels")


@dataclass(frozen=True)
class ModelSpec:
    name: str            # as in the paper's table
    kind: str            # single | packed | deep_ensembles | mimo | batch_ensemble
    num_estimators: int
    alpha: int = 1
    gamma: int = 1


MODELS: Dict[str, ModelSpec] = {
    "single": ModelSpec("Single", "single", 1),
    "pe241": ModelSpec("PE-(2,4,1)", "packed", 4, 2, 1),
    "pe242": ModelSpec("PE-(2,4,2)", "packed", 4, 2, 2),
    "de": ModelSpec("Deep Ensembles", "deep_ensembles", 4),
    "mimo": ModelSpec("MIMO", "mimo", 4),
    "be": ModelSpec("BatchEnsemble", "batch_ensemble", 4),
}

# Paper (Laurent et al., ICLR 2023), CIFAR-100 ResNet-50, batch 128, RTX 3090:
# (training s/epoch, inference images/s). Printed beside ours as ratios to the single model.
PAPER: Dict[str, Dict[str, Tuple[float, float]]] = {
    "fp16": {"single": (22.42, 5718), "pe241": (51.20, 3406), "pe242": (52.11, 3440),
             "de": (84.86, 1609), "mimo": (24.44, 5649), "be": (53.97, 1916)},
    "fp32": {"single": (37.06, 3709), "pe241": (179.50, 1381), "pe242": (175.10, 1501),
             "de": (145.30, 1001), "mimo": (37.90, 3574), "be": (58.78, 1809)},
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a model, an implementation, compiled or eager."""
    model: str           # key of MODELS
    impl: str            # "stock" (torch modules on cuDNN) or "packed_kernels"
    compiled: bool = False

    @property
    def key(self) -> str:
        return f"{self.model}-{self.impl}" + ("-compile" if self.compiled else "")

    @property
    def label(self) -> str:
        impl = "ours" if self.impl == "packed_kernels" else "stock"
        return f"{MODELS[self.model].name} [{impl}{', compiled' if self.compiled else ''}]"


DEFAULT_ROWS: Tuple[str, ...] = (
    "single-stock", "pe241-stock", "pe241-packed_kernels", "pe242-stock", "pe242-packed_kernels",
    "de-stock", "mimo-stock", "be-stock",
    "single-stock-compile", "pe241-stock-compile", "pe241-packed_kernels-compile",
)
CPU_ROWS: Tuple[str, ...] = DEFAULT_ROWS[:8]  # no compile rows: compiling on 2 cores takes minutes


def parse_row(key: str) -> Row:
    parts = key.split("-")
    compiled = parts[-1] == "compile"
    if compiled:
        parts = parts[:-1]
    if len(parts) == 1:
        parts.append("stock")
    if len(parts) != 2 or parts[0] not in MODELS or parts[1] not in IMPLS:
        raise ValueError(f"unknown row {key!r}: use <model>[-<impl>][-compile] with model in "
                         f"{sorted(MODELS)} and impl in {IMPLS}")
    return Row(parts[0], parts[1], compiled)


def parse_rows(keys: str) -> List[Row]:
    return [parse_row(k.strip()) for k in keys.split(",") if k.strip()]


def zoo():
    """packed_kernels.models when it exists, else None."""
    try:
        module = importlib.import_module("packed_kernels.models")
    except ModuleNotFoundError:
        return None
    return module if hasattr(module, "packed_resnet") else None


def model_source() -> str:
    return "packed_kernels.models" if zoo() is not None else "bench.standin (zoo not landed)"


def build_model(row: Row, *, arch: int = 50, in_channels: int = 3, num_classes: int = 100,
                ) -> Tuple[nn.Module, int, str]:
    """(model, num_estimators, source) for a row; the caller moves it to its device."""
    spec = MODELS[row.model]
    models = zoo()
    if models is None:
        from . import standin
        model = standin.build(spec.kind, in_channels, num_classes, spec.num_estimators,
                              spec.alpha, spec.gamma)
        if row.impl == "packed_kernels":
            model = convert(model)
        return model, spec.num_estimators, "stand-in"
    return _build_from_zoo(models, spec, row.impl, arch, in_channels, num_classes), \
        spec.num_estimators, f"resnet{arch}"


def _build_from_zoo(models, spec: ModelSpec, impl: str, arch: int, in_channels: int,
                    num_classes: int) -> nn.Module:
    raise NotImplementedError("wire packed_kernels.models in here once it lands")


@contextlib.contextmanager
def forced_backend(backend: str):
    """Within the block, convs that would pick their backend automatically (backend=None or
    "auto", as the modules call them) run on `backend` instead. "auto" changes nothing.

    The library has no public switch for this yet, so the op module's chooser is wrapped;
    explicit backend arguments are left alone."""
    if backend in (None, "auto"):
        yield
        return
    from packed_kernels.ops import conv as conv_ops
    choose = getattr(conv_ops, "_choose", None)
    if choose is None:
        raise RuntimeError("forced_backend: packed_kernels.ops.conv has no _choose() to wrap; "
                           "run with --ours-backend auto")
    # validate the name (and that it can run here) before any model is built
    conv_ops._backend.resolve("grouped_conv2d", backend, torch.device("cuda" if torch.cuda.is_available()
                              else "cpu"), torch.float32, conv_ops.IMPLEMENTED)

    def forced(op, requested, *args, **kwargs):
        return choose(op, backend if requested in (None, "auto") else requested, *args, **kwargs)
    conv_ops._choose = forced
    try:
        yield
    finally:
        conv_ops._choose = choose
