# SPDX-License-Identifier: Apache-2.0
"""packed_kernels: fused CUDA C++ and Triton kernels for Packed-Ensembles in PyTorch."""

from . import dispatch, export
from ._version import __version__
from ._backend import BACKENDS, BackendUnavailableError, available_backends
from .ops.batch_norm import batch_norm
from .ops.conv import fused_conv2d, grouped_conv2d
from .ops.ensemble import EnsembleScores, ensemble_mean, ensemble_scores
from .ops import flops as _flops  # noqa: F401  FLOP formulas for FlopCounterMode
from .nn.convert import convert

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "EnsembleScores",
    "available_backends",
    "batch_norm",
    "convert",
    "dispatch",
    "ensemble_mean",
    "ensemble_scores",
    "export",
    "fused_conv2d",
    "grouped_conv2d",
]
