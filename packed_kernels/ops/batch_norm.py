"""Batch norm over channels, then an optional residual add and activation, in one op."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._checks import check_float_tensor, check_same_device_dtype
from ._autograd import unaliased

IMPLEMENTED = ("torch",)  # the Triton and CUDA kernels register here as they land
ACTIVATIONS = (None, "relu")


def reference_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                         training: bool, momentum: float, eps: float, activation: Optional[str]) -> Tensor:
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    if activation == "relu":
        out = torch.relu(out)
    return out


def _activation_arg(activation: str) -> Optional[str]:
    return None if activation == "" else activation


def reference_batch_norm_backward(grad, input, running_mean, running_var, weight, bias, residual,
                                  training, eps, activation):
    """(grad_input, grad_weight, grad_bias, grad_residual); None for absent inputs."""
    ct = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims = [d for d in range(input.dim()) if d != 1]
    shape = [1, -1] + [1] * (input.dim() - 2)
    x = input.to(ct)
    if training:
        mean = x.mean(dims)
        invstd = torch.rsqrt(x.var(dims, unbiased=False) + eps)
    else:
        mean, invstd = running_mean.to(ct), torch.rsqrt(running_var.to(ct) + eps)
    x_hat = (x - mean.view(shape)) * invstd.view(shape)
    gamma = weight.to(ct) if weight is not None else torch.ones_like(mean)
    g = grad.to(ct)
    if activation == "relu":
        y = x_hat * gamma.view(shape)
        if bias is not None:
            y = y + bias.to(ct).view(shape)
        if residual is not None:
            y = y + residual.to(ct)
        g = torch.where(y > 0, g, torch.zeros_like(g))
    sum_g = g.sum(dims)
    sum_g_xhat = (g * x_hat).sum(dims)
    if training:
        count = input.numel() // input.shape[1]
        grad_input = (gamma * invstd / count).view(shape) * (
            count * g - sum_g.view(shape) - x_hat * sum_g_xhat.view(shape))
    else:
        grad_input = g * (gamma * invstd).view(shape)
    return (grad_input.to(input.dtype),
            None if weight is None else sum_g_xhat.to(weight.dtype),
            None if bias is None else sum_g.to(bias.dtype),
            None if residual is None else g.to(residual.dtype))


def _reference_with_stats(input, running_mean, running_var, weight, bias, residual, training, eps,
                          activation):
    """The reference output plus the batch mean and unbiased variance (training) that the
    caller folds into the running statistics; eval mode returns empty statistics."""
    out = reference_batch_norm(input, running_mean, running_var, weight, bias, residual, training, 0.0,
                               eps, _activation_arg(activation))
    if not training:
        return out, input.new_zeros(0, dtype=torch.float32), input.new_zeros(0, dtype=torch.float32)
    dims = [d for d in range(input.dim()) if d != 1]
    x = input.detach().float()
    return out, x.mean(dims), x.var(dims, unbiased=True)


# Functional (no mutation) so that it can carry an autograd formula; the public function applies
# the running-statistics update from the returned batch statistics.
@torch.library.custom_op("packed_kernels::batch_norm", mutates_args=())
def _batch_norm_op(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   training: bool, eps: float, activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    out, mean, var = _reference_with_stats(input, running_mean, running_var, weight, bias, residual,
                                           training, eps, activation)
    return out.detach(), mean, var


@_batch_norm_op.register_fake
def _(input, running_mean, running_var, weight, bias, residual, training, eps, activation, backend):
    stats = input.shape[1] if training else 0
    return (torch.empty_like(input), input.new_empty(stats, dtype=torch.float32),
            input.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("packed_kernels::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(grad: Tensor, input: Tensor, running_mean: Optional[Tensor],
                            running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                            residual: Optional[Tensor], training: bool, eps: float, activation: str,
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = reference_batch_norm_backward(grad, input, running_mean, running_var, weight, bias,
                                          residual, training, eps, _activation_arg(activation))
    return unaliased(grads, (grad, input, running_mean, running_var, weight, bias, residual), input)


@_batch_norm_backward_op.register_fake
def _(grad, input, running_mean, running_var, weight, bias, residual, training, eps, activation, backend):
    empty = input.new_empty(0)
    return (torch.empty_like(input), empty if weight is None else torch.empty_like(weight),
            empty if bias is None else torch.empty_like(bias),
            empty if residual is None else torch.empty_like(residual))


def _setup_context(ctx, inputs, output):
    (input, running_mean, running_var, weight, bias, residual, training, eps, activation,
     backend) = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight, bias, residual)
    ctx.args = (training, eps, activation, backend)


def _backward(ctx, grad, _grad_mean, _grad_var):
    input, running_mean, running_var, weight, bias, residual = ctx.saved_tensors
    g_input, g_weight, g_bias, g_residual = _batch_norm_backward_op(
        grad, input, running_mean, running_var, weight, bias, residual, *ctx.args)
    return (g_input, None, None, g_weight if weight is not None else None,
            g_bias if bias is not None else None, g_residual if residual is not None else None,
            None, None, None, None)


_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
               activation: Optional[str] = None, backend: Optional[str] = None) -> Tensor:
    """F.batch_norm(input, ...), then `+ residual`, then `activation` (None or "relu")."""
    op = "batch_norm"
    check_float_tensor(op, "input", input, min_dim=2)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{op}: {name} must have shape ({channels},), got {tuple(t.shape)}")
        if t is not None and t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: eval mode (training=False) needs running_mean and running_var")
    check_same_device_dtype(op, "input", input, residual=residual)
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"{op}: residual must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(residual.shape)}")
    if training and input.numel() // channels <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input "
                         f"of shape {tuple(input.shape)}")
    chosen = _backend.resolve(op, backend, input.device, input.dtype, IMPLEMENTED)
    stats = (None, None) if training else (running_mean, running_var)
    out, batch_mean, batch_var = _batch_norm_op(input, *stats, weight, bias, residual, bool(training),
                                                float(eps), activation or "", chosen)
    if training and running_mean is not None:
        with torch.no_grad():  # as torch: running = (1 - momentum) * running + momentum * batch
            running_mean.mul_(1.0 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum)
    return out
