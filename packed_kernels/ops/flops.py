# SPDX-License-Identifier: Apache-2.0
"""FLOP formulas of the packed_kernels custom ops, for torch.utils.flop_counter.FlopCounterMode
(and with it torch.profiler's with_flops).

Every op counts what FlopCounterMode counts for its stock torch equivalent, so a model on our
ops counts the same as on torch's modules:
- a convolution counts 2 * (multiply-adds of the convolution), as aten.convolution does
  (the bias ignored); its backward counts the input- and weight-gradient convolutions as
  aten.convolution_backward does (both always: the op computes both, where torch skips the
  input gradient of an input that needs none);
- the fused convolution counts its convolution only: the fused batch-norm scale and shift,
  residual, ReLU and channel statistics are elementwise or reductions, which FlopCounterMode
  does not count for torch's own batch norm and activations. Its backward counts the gradients
  it is asked for; the pre-epilogue output it recomputes (rather than keep it alive) is a
  memory trade, not model arithmetic, and is not counted;
- batch norm and the ensemble ops (mean of softmaxes, uncertainty scores) count 0, as
  aten.native_batch_norm, softmax, log and the reductions do. They are registered all the
  same, so they show in FlopCounterMode's per-op table.

Eager calls to our ops skip torch's dispatcher, but not under a dispatch mode such as
FlopCounterMode: there they run the registered op, which these formulas count."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

# Importing the op modules registers the ops these formulas are attached to.
from . import batch_norm as _batch_norm  # noqa: F401
from . import conv as _conv  # noqa: F401
from . import ensemble as _ensemble  # noqa: F401

_ops = torch.ops.packed_kernels


def _conv_gradients_flops(grad_out_shape, x_shape, w_shape, need_input: bool,
                          need_weight: bool) -> int:
    """aten.convolution_backward's count (non-transposed): the input gradient is the
    transposed convolution of grad_out with the weight, the weight gradient the convolution of
    the input with grad_out."""
    def swap(shape):
        return [shape[1], shape[0], *shape[2:]]
    flops = 0
    if need_input:
        flops += conv_flop_count(grad_out_shape, w_shape, x_shape, transposed=True)
    if need_weight:
        flops += conv_flop_count(swap(x_shape), swap(grad_out_shape), swap(w_shape))
    return flops


def grouped_conv2d_flops(x_shape, w_shape, _bias, *_args, out_shape=None, **_kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape)


def grouped_conv2d_backward_flops(grad_shape, x_shape, w_shape, *args, out_shape=None,
                                  **_kwargs) -> int:
    need_input, need_weight = args[-2:]
    return _conv_gradients_flops(grad_shape, x_shape, w_shape, need_input, need_weight)


def fused_conv2d_flops(x_shape, w_shape, *_args, out_shape=None, **_kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape[0])  # out_shape: (out, mean, var)


def fused_conv2d_backward_flops(grad_out_shape, _grad_stats, _out, x_shape, w_shape, *args,
                                out_shape=None, **_kwargs) -> int:
    need_input, need_weight = args[-2:]
    return _conv_gradients_flops(grad_out_shape, x_shape, w_shape, need_input, need_weight)


def elementwise_and_reductions(*_args, out_shape=None, **_kwargs) -> int:
    return 0


FORMULAS = {
    _ops.grouped_conv2d: grouped_conv2d_flops,
    _ops.grouped_conv2d_backward: grouped_conv2d_backward_flops,
    _ops.fused_conv2d: fused_conv2d_flops,
    _ops.fused_conv2d_backward: fused_conv2d_backward_flops,
    _ops.batch_norm: elementwise_and_reductions,
    _ops.batch_norm_backward: elementwise_and_reductions,
    _ops.ensemble_mean: elementwise_and_reductions,
    _ops.ensemble_mean_backward: elementwise_and_reductions,
    _ops.ensemble_scores: elementwise_and_reductions,
    _ops.ensemble_scores_backward: elementwise_and_reductions,
}

for _op, _formula in FORMULAS.items():
    if _op not in flop_registry:  # a module reload must not register twice (torch refuses)
        register_flop_formula(_op)(_formula)
