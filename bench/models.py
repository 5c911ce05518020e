# SPDX-License-Identifier: Apache-2.0
"""The speed table's rows and how each one's model is built.

One place maps a row ("PE-(2,4,1)", impl "stock" or "packed_kernels") to a model from
packed_kernels.models. Every model returns estimator-major logits (M*B, classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn


IMPLS = ("stock", "packed_kernels")


@dataclass(frozen=True)
class ModelSpec:
    name: str            # as in the paper's table
    kind: str            # single | packed | deep_ensembles | mimo | batch_ensemble | masksembles
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
    "masksembles": ModelSpec("Masksembles", "masksembles", 4),
}
# The paper's Masksembles configuration (M = 4 above); its masks are drawn from a fixed seed so
# every run of the table times the same network.
MASKSEMBLES_SCALE = 2.0
MASKSEMBLES_SEED = 0

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
    "de-stock", "mimo-stock", "be-stock", "masksembles-stock", "masksembles-packed_kernels",
    "single-stock-compile", "pe241-stock-compile", "pe241-packed_kernels-compile",
)
# no compile rows: compiling on 2 cores takes minutes
CPU_ROWS: Tuple[str, ...] = tuple(k for k in DEFAULT_ROWS if not k.endswith("-compile"))


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


def build_model(row: Row, *, arch: int = 50, in_channels: int = 3, num_classes: int = 100,
                ours_backend: str = "auto") -> Tuple[nn.Module, int, str]:
    """(model, num_estimators, source) for a row, from packed_kernels.models (CIFAR style);
    the caller moves it to its device.

    Stock rows: torch's nn.BatchNorm2d and every packed layer routed to torch's own conv
    (packed_kernels.nn.set_backend(model, "stock")), i.e. grouped nn.Conv2d on cuDNN as
    torch-uncertainty runs it. packed_kernels rows: the zoo's defaults (our batch norm where it
    exists) with the convs on `ours_backend` ("auto": the library's own choice)."""
    from packed_kernels import models, nn as pk_nn
    spec = MODELS[row.model]
    kwargs = {"style": "cifar"}
    if row.impl == "stock":
        kwargs["normalization_layer"] = nn.BatchNorm2d
    m = spec.num_estimators
    if spec.kind == "single":
        model = models.resnet(in_channels, num_classes, arch, **kwargs)
    elif spec.kind == "packed":
        model = models.packed_resnet(in_channels, num_classes, arch, num_estimators=m,
                                     alpha=spec.alpha, gamma=spec.gamma, **kwargs)
    elif spec.kind == "deep_ensembles":
        model = models.deep_ensemble_resnet(in_channels, num_classes, arch, num_estimators=m, **kwargs)
    elif spec.kind == "mimo":
        model = models.mimo_resnet(in_channels, num_classes, arch, num_estimators=m, **kwargs)
    elif spec.kind == "batch_ensemble":
        model = models.batched_resnet(in_channels, num_classes, arch, num_estimators=m, **kwargs)
    elif spec.kind == "masksembles":
        # "legacy": every member sees the whole batch in training, as the BatchEnsemble row does
        model = models.masksembles_resnet(in_channels, num_classes, arch, num_estimators=m,
                                          scale=MASKSEMBLES_SCALE, repeat_strategy="legacy",
                                          seed=MASKSEMBLES_SEED, **kwargs)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    backend = "stock" if row.impl == "stock" else (None if ours_backend in (None, "auto") else ours_backend)
    pk_nn.set_backend(model, backend)
    return model, m, f"packed_kernels.models resnet{arch} (cifar)"


def model_source(arch: int = 50) -> str:
    return f"packed_kernels.models ResNet-{arch} (CIFAR style)"


def training_batch(row: Row, x: torch.Tensor, y: torch.Tensor, num_estimators: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(model input, estimator-major targets (M*B,)) of one training step on B images.

    Every model sees the B images once per estimator and is trained on targets repeated M
    times - except MIMO, which trains on M batches side by side (M*B images in, one B-image
    network pass), each estimator seeing the batch in its own order as torch-uncertainty's
    MIMO routine shuffles it."""
    if MODELS[row.model].kind != "mimo":
        return x, y.repeat(num_estimators)
    b = x.shape[0]
    order = torch.cat([torch.arange(b, device=x.device)] +
                      [torch.randperm(b, device=x.device) for _ in range(num_estimators - 1)])
    return x[order], y[order]
