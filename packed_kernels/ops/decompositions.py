# SPDX-License-Identifier: Apache-2.0
"""Decompositions of every packed_kernels custom op into stock torch (aten) ops.

`ExportedProgram.run_decompositions(DECOMPOSITIONS)` (merged into torch's default table, as
packed_kernels.export does) replaces each `packed_kernels::*` node by the op's torch
reference: the convolutions by aten.convolution (or convolution_backward) with the fused
per-channel scale, shift, residual and ReLU as elementwise ops, batch norm by aten batch norm +
add + relu, the ensemble ops by softmax / mean / log and reductions. The result holds core aten
ops only, so it serialises, loads and runs (ONNX included) in a process that never imports
packed_kernels.

Each decomposition computes the function its op computes on the "torch" backend, whatever
`backend` the traced call named: the references in conv_reference.py, batch_norm.py and
ensemble.py state that function, and this module only routes the op's arguments to them."""

from __future__ import annotations

from typing import Dict

import torch

from .._conventions import stats_dtype
from . import batch_norm as _batch_norm
from . import conv as _conv  # noqa: F401  registers the conv ops
from . import ensemble as _ensemble
from .conv_engines import engine, epilogue_hooks, has_epilogue, prologue_hooks
from .conv_reference import (epilogue_glue, prologue_glue, reference_conv2d,
                             reference_conv2d_backward, reference_prologue)

_ops = torch.ops.packed_kernels


def _torch_conv_forward(*args):
    return engine("torch").forward(*args)


def grouped_conv2d(input, weight, bias, stride, padding, dilation, groups, backend):
    out, _, _ = _torch_conv_forward(input, weight, bias, stride, padding, dilation, groups,
                                    prologue_hooks(None, None, None),
                                    epilogue_hooks(None, None, None, None), False)
    return out


def grouped_conv2d_backward(grad, input, weight, has_bias, stride, padding, dilation, groups,
                            backend, need_input, need_weight):
    grads = reference_conv2d_backward(grad, input, weight, has_bias, stride, padding, dilation,
                                      groups, (need_input, need_weight))
    return tuple(like.new_empty(0) if g is None else g for g, like in zip(grads, (input, weight, weight)))


def fused_conv2d(input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, stride,
                 padding, dilation, groups, in_activation, activation, channel_stats, backend):
    out, mean, var = _torch_conv_forward(
        input, weight, bias, stride, padding, dilation, groups,
        prologue_hooks(in_scale, in_shift, in_activation),
        epilogue_hooks(out_scale, out_shift, residual, activation), channel_stats)
    if not channel_stats:  # the op's fixed structure: empty statistics when not asked
        mean = var = input.new_empty(0, dtype=stats_dtype(input.dtype))
    return out, mean, var


def fused_conv2d_backward(grad_out, grad_stats, out, input, weight, bias, in_scale, in_shift,
                          out_scale, out_shift, residual, stride, padding, dilation, groups,
                          in_activation, activation, channel_stats, backend, need_input,
                          need_weight):
    """The op's backward on the torch engine: recompute x_hat (and y where the epilogue hid
    it), the epilogue glue, aten.convolution_backward, the prologue glue."""
    x_hat = reference_prologue(input, in_scale, in_shift, in_activation)
    y = None
    if out_scale is not None or channel_stats:
        y = out
        if has_epilogue(out_scale, out_shift, residual, activation):
            y = reference_conv2d(x_hat, weight, bias, stride, padding, dilation, groups)
    grad_y, grad_residual, sum_grad_y, sum_grad_zy, sum_grad_z = epilogue_glue(
        grad_out, out, y, out_scale, grad_stats if channel_stats else None, residual, activation,
        input.dtype, bias is not None, out_shift is not None)
    grad_x_hat, grad_weight, _ = reference_conv2d_backward(
        grad_y, x_hat, weight, False, stride, padding, dilation, groups, (need_input, need_weight))
    grad_input = sum_grad_ux = sum_grad_u = None
    if grad_x_hat is not None:
        grad_input, sum_grad_ux, sum_grad_u = prologue_glue(grad_x_hat, input, in_scale, in_shift,
                                                            in_activation == "relu")

    def present(total, like):  # absent gradients are empty tensors (a custom op has no None)
        if like is None or total is None:
            return input.new_empty(0)
        return total.to(like.dtype)

    return (present(grad_input, input), present(grad_weight, weight), present(sum_grad_y, bias),
            present(sum_grad_ux, in_scale), present(sum_grad_u, in_shift),
            present(sum_grad_zy, out_scale), present(sum_grad_z, out_shift),
            present(grad_residual, residual))


def batch_norm(input, running_mean, running_var, weight, bias, residual, training, eps,
               activation, backend):
    relu = activation == "relu"
    if training:
        return _batch_norm.reference_forward(input, running_mean, running_var, weight, bias,
                                             residual, training, eps, relu)
    # Eval: normalise by the given statistics elementwise rather than by aten batch norm, which
    # refuses gradients to its running statistics (the fused blocks pass a conv's batch
    # statistics there, and the op differentiates through them).
    compute = stats_dtype(input.dtype)
    shape = [1, -1] + [1] * (input.dim() - 2)
    invstd = torch.rsqrt(running_var.to(compute) + eps)
    out = (input.to(compute) - running_mean.to(compute).view(shape)) * invstd.view(shape)
    if weight is not None:
        out = out * weight.to(compute).view(shape)
    if bias is not None:
        out = out + bias.to(compute).view(shape)
    if residual is not None:
        out = out + residual.to(compute)
    out = (torch.relu(out) if relu else out).to(input.dtype)
    empty = input.new_empty(0, dtype=compute)
    return out, empty, empty.clone(), empty.clone()


def batch_norm_backward(grad, input, output, mean, invstd, weight, has_residual, training,
                        activation, backend):
    return _batch_norm.reference_batch_norm_backward(grad, input, output, mean, invstd, weight,
                                                     has_residual, training, activation == "relu")


def ensemble_mean(logits, num_estimators, backend):
    return _ensemble.reference_mean(logits, num_estimators)


def ensemble_mean_backward(grad, logits, num_estimators, backend):
    return _ensemble.reference_mean_backward(grad, logits, num_estimators)


def ensemble_scores(logits, num_estimators, backend):
    return tuple(_ensemble.reference_scores(logits, num_estimators))


def ensemble_scores_backward(grad_probs, grad_msp, grad_max_logit, grad_entropy,
                             grad_mutual_information, logits, num_estimators, backend):
    grads = (grad_probs, grad_msp, grad_max_logit, grad_entropy, grad_mutual_information)
    return _ensemble.reference_scores_backward(grads, logits, num_estimators)


DECOMPOSITIONS: Dict[torch._ops.OpOverload, object] = {
    _ops.grouped_conv2d.default: grouped_conv2d,
    _ops.grouped_conv2d_backward.default: grouped_conv2d_backward,
    _ops.fused_conv2d.default: fused_conv2d,
    _ops.fused_conv2d_backward.default: fused_conv2d_backward,
    _ops.batch_norm.default: batch_norm,
    _ops.batch_norm_backward.default: batch_norm_backward,
    _ops.ensemble_mean.default: ensemble_mean,
    _ops.ensemble_mean_backward.default: ensemble_mean_backward,
    _ops.ensemble_scores.default: ensemble_scores,
    _ops.ensemble_scores_backward.default: ensemble_scores_backward,
}
