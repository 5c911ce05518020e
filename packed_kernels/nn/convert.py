# SPDX-License-Identifier: Apache-2.0
"""The model-wide tools. convert(model): put packed_kernels modules in place of
torch-uncertainty's packed layers (PackedConv1d/2d/3d, PackedConvTranspose2d, PackedLinear of
every implementation), grouped nn.Conv2d and nn.BatchNorm2d, in place, sharing the same
parameter tensors, so outputs and state_dict keys are unchanged. set_backend(model, backend):
the engine of every packed_kernels layer in a model.

torch-uncertainty is not a dependency, so its layers are recognised by class name and the
attributes its 0.13 layers carry (an inner `conv` or `conv_transpose`, or PackedLinear's 3-D
or sparse `weight`)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .. import _backend
from .batch_norm import BatchNorm2d
from .packed import GroupedConv2d, PackedConv1d, PackedConv2d, PackedConv3d, PackedConvTranspose2d
from .packed_linear import PackedLinear
from .packing import STOCK

_OURS = (PackedConv1d, PackedConv2d, PackedConv3d, PackedConvTranspose2d, PackedLinear, GroupedConv2d)


_PACKED_CONVS = {  # torch-uncertainty class name -> (ours, its inner module's attribute and type)
    "PackedConv1d": (PackedConv1d, "conv", nn.Conv1d),
    "PackedConv2d": (PackedConv2d, "conv", nn.Conv2d),
    "PackedConv3d": (PackedConv3d, "conv", nn.Conv3d),
    "PackedConvTranspose2d": (PackedConvTranspose2d, "conv_transpose", nn.ConvTranspose2d),
}


def _packed_conv_replacement(module: nn.Module) -> Optional[nn.Module]:
    entry = _PACKED_CONVS.get(type(module).__name__)
    if entry is None:
        return None
    cls, attribute, inner = entry
    conv = getattr(module, attribute, None)
    if type(conv) is not inner or not hasattr(module, "num_estimators"):
        return None
    new = cls.from_conv(conv, module.num_estimators, first=getattr(module, "first", False),
                        last=getattr(module, "last", False))
    return new.train(module.training)


def _packed_linear_replacement(module: nn.Module) -> Optional[nn.Module]:
    if type(module).__name__ != "PackedLinear" or not hasattr(module, "num_estimators"):
        return None
    weight = getattr(module, "weight", None)
    sparse = weight is not None and weight.layout != torch.strided
    if weight is None or (weight.dim() != 3 and not sparse) or (sparse and not hasattr(module, "groups")):
        warnings.warn("convert: a PackedLinear whose weight is neither 3-D nor a sparse "
                      "block-diagonal matrix with its `groups` is left as it is", stacklevel=3)
        return None
    implementation = getattr(module, "implementation", "einsum")
    if implementation not in PackedLinear.IMPLEMENTATIONS or (implementation == "sparse") != sparse:
        implementation = "sparse" if sparse else "einsum"
    return PackedLinear.from_parameters(weight, module.bias, module.num_estimators,
                                        first=getattr(module, "first", False),
                                        last=getattr(module, "last", False),
                                        implementation=implementation,
                                        groups=getattr(module, "groups", None)).train(module.training)


def _batch_norm_replacement(module: nn.Module) -> Optional[nn.Module]:
    if type(module) is not nn.BatchNorm2d:
        return None
    return BatchNorm2d.from_batch_norm(module)


def _replacement(module: nn.Module) -> Optional[nn.Module]:
    if type(module) is nn.Conv2d and module.groups > 1:
        return GroupedConv2d.from_conv2d(module)
    for find in (_packed_conv_replacement, _packed_linear_replacement, _batch_norm_replacement):
        new = find(module)
        if new is not None:
            return new
    return None


def convert(model: nn.Module) -> nn.Module:
    """Swap supported layers of `model` for packed_kernels modules, in place; returns `model`
    (or the replacement when `model` itself is a supported layer). Parameters and buffers are
    the same tensor objects, so optimisers holding them keep working."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    top = _replacement(model)
    if top is not None:
        return top
    for name, child in list(model.named_children()):
        if isinstance(child, _OURS):
            continue
        new = _replacement(child)
        if new is not None:
            setattr(model, name, new)
        else:
            convert(child)
    return model


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Choose the engine of every packed_kernels layer in `model`: None/"auto" (the op picks),
    one of packed_kernels.BACKENDS, or "stock" (torch's own convolution, bypassing our ops;
    packed_kernels.nn.BatchNorm2d then runs its torch reference, F.batch_norm + add + ReLU).
    Returns `model`.

    Args:
        model: any nn.Module; its packed_kernels layers (convolutions, BatchNorm2d,
            ConvBNAct2d, BatchConv2d, ...) get the backend, other modules are left alone.
        backend: None, "auto", "stock" or a name in packed_kernels.BACKENDS ("torch",
            "triton", "cuda", "simt"); a layer whose call that backend cannot run raises
            BackendUnavailableError at its forward."""
    allowed = (None, "auto", STOCK) + tuple(_backend.BACKENDS)
    if backend not in allowed:
        raise ValueError(f"set_backend: backend must be one of {allowed}, got {backend!r}")
    for module in model.modules():
        if getattr(type(module), "routes_through_packed_ops", False):
            module.backend = backend
        elif isinstance(module, BatchNorm2d):
            module.backend = "torch" if backend == STOCK else backend
    return model
