"""Drop-in modules: Packed-Ensembles layers (torch-uncertainty compatible) and the ensemble head."""

from .convert import convert
from .ensemble import EnsembleMean, predict, repeat_targets
from .packed import GroupedConv2d, PackedConv1d, PackedConv2d, PackedLinear, set_backend

__all__ = [
    "convert",
    "EnsembleMean",
    "GroupedConv2d",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "predict",
    "repeat_targets",
    "set_backend",
]
