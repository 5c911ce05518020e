"""convert(model): put packed_kernels modules in place of torch-uncertainty's packed layers,
grouped nn.Conv2d and (once it exists) nn.BatchNorm2d, in place, sharing the same parameter
tensors, so outputs and state_dict keys are unchanged.

torch-uncertainty is not a dependency, so its layers are recognised by class name and the
attributes its 0.13 layers carry (an inner `conv`, or PackedLinear's 3-D `weight`)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .packed import GroupedConv2d, PackedConv1d, PackedConv2d, PackedLinear

_OURS = (PackedConv1d, PackedConv2d, PackedLinear, GroupedConv2d)


def _packed_conv_replacement(module: nn.Module) -> Optional[nn.Module]:
    ours = {"PackedConv2d": (PackedConv2d, nn.Conv2d), "PackedConv1d": (PackedConv1d, nn.Conv1d)}
    entry = ours.get(type(module).__name__)
    if entry is None:
        return None
    cls, inner = entry
    if type(getattr(module, "conv", None)) is not inner or not hasattr(module, "num_estimators"):
        return None
    new = cls.from_conv(module.conv, module.num_estimators, first=getattr(module, "first", False),
                        last=getattr(module, "last", False))
    return new.train(module.training)


def _packed_linear_replacement(module: nn.Module) -> Optional[nn.Module]:
    if type(module).__name__ != "PackedLinear" or not hasattr(module, "num_estimators"):
        return None
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 3 or weight.layout != torch.strided:
        warnings.warn("convert: a PackedLinear with a non-3-D or sparse weight (implementation="
                      "'sparse') is left as it is", stacklevel=3)
        return None
    return PackedLinear.from_parameters(weight, module.bias, module.num_estimators,
                                        first=getattr(module, "first", False),
                                        last=getattr(module, "last", False)).train(module.training)


def _batch_norm_replacement(module: nn.Module) -> Optional[nn.Module]:
    if type(module) is not nn.BatchNorm2d:
        return None
    try:  # packed_kernels.nn.BatchNorm2d lands separately; until then BN stays torch's
        from . import BatchNorm2d  # type: ignore[attr-defined]
    except ImportError:
        return None
    if hasattr(BatchNorm2d, "from_batch_norm"):
        return BatchNorm2d.from_batch_norm(module)
    if not issubclass(BatchNorm2d, nn.BatchNorm2d):
        return None
    new = BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, device="meta")
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in module.named_buffers(recurse=False):
        new._buffers[name] = buffer
    return new.train(module.training)


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
