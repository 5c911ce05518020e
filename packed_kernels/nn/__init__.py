# SPDX-License-Identifier: Apache-2.0
"""Drop-in modules: Packed-Ensembles layers (torch-uncertainty compatible) and the ensemble head."""

from .batch_norm import BatchNorm2d
from .conv_bn import ConvBNAct2d, DeferredBatchNorm, conv_bn_act, reuse_inference_operands
from .convert import convert, set_backend
from .ensemble import EnsembleMean, predict, repeat_targets
from .masksembles import MaskedConv2d, MaskedLinear
from .packed import GroupedConv2d, PackedConv1d, PackedConv2d, PackedConv3d, PackedConvTranspose2d
from .packed_linear import PackedLinear

__all__ = [
    "BatchNorm2d",
    "ConvBNAct2d",
    "conv_bn_act",
    "DeferredBatchNorm",
    "convert",
    "EnsembleMean",
    "GroupedConv2d",
    "MaskedConv2d",
    "MaskedLinear",
    "PackedConv1d",
    "PackedConv2d",
    "PackedConv3d",
    "PackedConvTranspose2d",
    "PackedLinear",
    "predict",
    "repeat_targets",
    "reuse_inference_operands",
    "set_backend",
]
