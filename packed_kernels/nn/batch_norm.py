# SPDX-License-Identifier: Apache-2.0
"""BatchNorm2d on packed_kernels.batch_norm: a drop-in for torch.nn.BatchNorm2d."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.batch_norm import batch_norm


class BatchNorm2d(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d with the same arguments, parameters, buffers and state_dict
    (including num_batches_tracked and momentum=None's cumulative average), running on
    pk.batch_norm. forward(input, residual=None) optionally adds a residual; `activation="relu"`
    applies ReLU in the same kernel pass. `backend` picks the engine (None: the best usable).
    Input (N, num_features, H, W) (NCHW or channels_last; float32 / float16 / bfloat16 on the
    kernel backends, any float dtype on "torch"); output of the same shape, dtype and layout.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: nn.BatchNorm2d's.
        activation: None or "relu", applied after the (optional) residual add.
        backend: pk.batch_norm's `backend`: None or "auto" (CUDA tensors: Triton where usable,
            else CUDA C++; the CPU: torch), or one of packed_kernels.BACKENDS ("torch",
            "triton", "cuda", "simt"); packed_kernels.nn.set_backend sets it."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 activation: Optional[str] = None, backend: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_batch_norm(cls, module: nn.BatchNorm2d, *, activation: Optional[str] = None,
                        backend: Optional[str] = None) -> "BatchNorm2d":
        """The same parameters and buffers (shared, not copied) behind this module."""
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, device="meta", activation=activation, backend=backend)
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            new._buffers[name] = buffer
        return new.train(module.training)

    def count_batch(self) -> float:
        """Counts this batch in num_batches_tracked (training with running statistics, as torch's
        forward does) and returns torch's momentum for the step."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        factor = self.count_batch()
        # as torch: batch statistics in training, or whenever there are no running statistics
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if track else None,
                          self.running_var if track else None, self.weight, self.bias,
                          use_batch_stats, factor, self.eps, residual=residual,
                          activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        return extra
