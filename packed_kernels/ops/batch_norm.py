# SPDX-License-Identifier: Apache-2.0
"""Batch norm over channels, then an optional residual add and activation, in one op."""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _alloc, _backend
from .._checks import check_float_tensor, check_same_device_dtype
from .._conventions import check_activation, stats_dtype
from ._autograd import library_op, unaliased


def reference_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                         training: bool, momentum: float, eps: float, activation: Optional[str]) -> Tensor:
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    if activation == "relu":
        out = torch.relu(out)
    return out


def reference_batch_norm_backward(grad, input, output, mean, invstd, weight, has_residual: bool,
                                  training: bool, relu: bool):
    """(grad_input, grad_weight, grad_bias, grad_residual) as the kernels return them: weight and
    bias gradients in the statistics dtype, an empty grad_residual without a residual.
    `mean`/`invstd` are the batch statistics (training) or the running ones (eval); the ReLU
    mask is read from `output` (out <= 0 exactly where the pre-activation is <= 0; a NaN output
    passes the gradient, as torch's relu backward does)."""
    ct = stats_dtype(input.dtype)
    dims = [d for d in range(input.dim()) if d != 1]
    shape = [1, -1] + [1] * (input.dim() - 2)
    x_hat = (input.to(ct) - mean.to(ct).view(shape)) * invstd.to(ct).view(shape)
    scale = invstd.to(ct) * (weight.to(ct) if weight is not None else 1.0)
    g = grad.to(ct)
    if relu:
        g = torch.where(output <= 0, torch.zeros_like(g), g)
    sum_g = g.sum(dims)
    sum_g_xhat = (g * x_hat).sum(dims)
    if training:
        count = input.numel() // input.shape[1]
        g_norm = g - (sum_g / count).view(shape) - x_hat * (sum_g_xhat / count).view(shape)
    else:
        g_norm = g
    grad_input = (g_norm * scale.view(shape)).to(input.dtype)
    grad_residual = g.to(input.dtype) if has_residual else input.new_empty(0)
    return grad_input, sum_g_xhat, sum_g, grad_residual


def reference_forward(input, running_mean, running_var, weight, bias, residual, training, eps, relu):
    """The reference output plus the batch mean, unbiased variance and invstd (training) that
    the backward and the running-statistics update use; eval mode returns empty statistics."""
    ct = stats_dtype(input.dtype)
    up = [None if t is None else t.to(ct) for t in (input, running_mean, running_var, weight, bias, residual)]
    out = reference_batch_norm(*up, training, 0.0, eps, "relu" if relu else None).to(input.dtype)
    if not training:
        return (out, *(input.new_zeros(0, dtype=ct) for _ in range(3)))
    dims = [d for d in range(input.dim()) if d != 1]
    x = input.detach().to(ct)
    biased = x.var(dims, unbiased=False)
    count = input.numel() // input.shape[1]
    return out, x.mean(dims), biased * count / (count - 1), torch.rsqrt(biased + eps)


class _Engine(NamedTuple):
    forward: Callable  # (input, rm, rv, weight, bias, residual, training, eps, relu) -> out, mean, var, invstd
    backward: Callable  # (grad, input, output, mean, invstd, weight, has_residual, training, relu)


def _triton_engine() -> _Engine:
    from ..triton import batch_norm as tk
    return _Engine(tk.forward, tk.backward)


def _kernel_layout(t: Tensor) -> Tensor:
    """t itself when the csrc kernels read it as is (contiguous or channels_last), else a copy."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or \
            (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)):
        return t
    return t.contiguous()


def _like(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """t in x's layout (a copy only when its strides differ)."""
    if t is None or x.is_contiguous():
        return None if t is None else t.contiguous()
    return t.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _extension_engine(name: str) -> Callable[[], _Engine]:
    """The csrc kernels in packed_kernels.<name>; outputs are allocated here (poisonable)."""
    def load() -> _Engine:
        ext = _backend.extension(name)

        def workspace(x):  # the kernels' per-split partial statistics (fp32)
            return _alloc.empty((ext.batch_norm_workspace_floats(x),), x, torch.float32)

        def forward(input, running_mean, running_var, weight, bias, residual, training, eps, relu):
            x = _kernel_layout(input)
            out = _alloc.empty_like(x)
            stats = [_alloc.empty((x.shape[1],), x, torch.float32) if training else x.new_empty(0, dtype=torch.float32)
                     for _ in range(3)]
            ext.batch_norm_forward(x, _like(residual, x), _fp32(running_mean), _fp32(running_var), _fp32(weight),
                                   _fp32(bias), training, eps, relu, out, *(stats if training else (None,) * 3),
                                   workspace(x) if training else None)
            return (out, *stats)

        def backward(grad, input, output, mean, invstd, weight, has_residual, training, relu):
            x = _kernel_layout(input)
            grad_input = _alloc.empty_like(x)
            grad_weight, grad_bias = (_alloc.empty((x.shape[1],), x, torch.float32) for _ in range(2))
            grad_residual = _alloc.empty_like(x) if has_residual else None
            ext.batch_norm_backward(_like(grad, x), x, _like(output, x) if relu else None, _fp32(mean),
                                    _fp32(invstd), _fp32(weight), training, relu, grad_input, grad_weight,
                                    grad_bias, grad_residual, workspace(x))
            return (grad_input, grad_weight, grad_bias,
                    grad_residual if has_residual else x.new_empty(0))
        return _Engine(forward, backward)
    return load


_ENGINES: Dict[str, Callable[[], _Engine]] = {
    "torch": lambda: _Engine(reference_forward, reference_batch_norm_backward),
    "triton": _triton_engine,
    "cuda": _extension_engine("_C"),
    "simt": _extension_engine("_simt"),
}
IMPLEMENTED = tuple(_ENGINES)


# Functional (no mutation) so that it can carry an autograd formula; the public function applies
# the running-statistics update from the returned batch statistics.
@library_op("packed_kernels::batch_norm")
@_backend.on_input_device
def _batch_norm_op(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   training: bool, eps: float, activation: Optional[str], backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, mean, var, invstd = _ENGINES[backend]().forward(
        input, running_mean, running_var, weight, bias, residual, training, eps, activation == "relu")
    return out.detach(), mean, var, invstd


@_batch_norm_op.register_fake
def _(input, running_mean, running_var, weight, bias, residual, training, eps, activation, backend):
    stats = input.shape[1] if training else 0
    ct = stats_dtype(input.dtype)
    return (torch.empty_like(input), *(input.new_empty(stats, dtype=ct) for _ in range(3)))


@library_op("packed_kernels::batch_norm_backward")
@_backend.on_input_device
def _batch_norm_backward_op(grad: Tensor, input: Tensor, output: Optional[Tensor], mean: Tensor,
                            invstd: Tensor, weight: Optional[Tensor], has_residual: bool,
                            training: bool, activation: Optional[str], backend: str
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _ENGINES[backend]().backward(grad, input, output, mean, invstd, weight, has_residual,
                                         training, activation == "relu")
    return unaliased(grads, (grad, input, output, mean, invstd, weight), input)


@_batch_norm_backward_op.register_fake
def _(grad, input, output, mean, invstd, weight, has_residual, training, activation, backend):
    ct = stats_dtype(input.dtype)
    channels = input.shape[1]
    return (torch.empty_like(input), input.new_empty(channels, dtype=ct),
            input.new_empty(channels, dtype=ct),
            torch.empty_like(input) if has_residual else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    (input, running_mean, running_var, weight, bias, residual, training, eps, activation,
     backend) = inputs
    out, mean, _var, invstd = output
    if not training:  # eval: the running statistics normalise, and get no gradient
        # copies: `.to` of a matching dtype would alias the op's input
        mean = running_mean.to(stats_dtype(input.dtype), copy=True)
        invstd = torch.rsqrt(running_var.to(stats_dtype(input.dtype), copy=True) + eps)
    ctx.save_for_backward(input, out if activation == "relu" else None, mean, invstd, weight)
    ctx.args = (residual is not None, training, activation, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad, _grad_mean, _grad_var, _grad_invstd):
    input, output, mean, invstd, weight = ctx.saved_tensors
    has_residual, training = ctx.args[0], ctx.args[1]
    g_input, g_weight, g_bias, g_residual = _batch_norm_backward_op(
        grad, input, output, mean, invstd, weight, *ctx.args)
    g_running_mean = g_running_var = None
    if not training and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        # Statistics given as tensors with gradients (e.g. a conv epilogue's mean and variance):
        # d/d mean = -gamma invstd sum g,  d/d var = -gamma invstd^2 sum(g x_hat) / 2
        gamma_invstd = invstd if weight is None else invstd * weight.to(invstd.dtype)
        g_running_mean = -gamma_invstd * g_bias
        g_running_var = -0.5 * gamma_invstd * invstd * g_weight
    return (g_input, g_running_mean, g_running_var,
            g_weight.to(weight.dtype) if weight is not None else None,
            g_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
            g_residual if has_residual else None,
            None, None, None, None)


_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
               activation: Optional[str] = None, backend: Optional[str] = None) -> Tensor:
    """F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps),
    then `+ residual`, then `activation`, in one pass. Differentiable in input, weight, bias,
    residual, and (eval mode) in running_mean and running_var.

    Args:
        input: (N, C, *) (e.g. (N, C, H, W): contiguous, channels_last or strided), float32,
            float16, bfloat16 (kernel backends) or any float dtype ("torch"). N may be 0.
        running_mean, running_var: (C,) float tensors on input's device, or both None
            (training only). In training they are updated in place, as torch does:
            running = (1 - momentum) * running + momentum * batch statistic (unbiased
            variance); in eval they normalise.
        weight, bias: (C,) the affine gamma and beta, or None (1 and 0).
        training: normalise by the batch statistics (True) or the running ones (False).
        momentum: the running statistics' update factor (a float).
        eps: added to the variance; > 0 in training.
        residual: a tensor of input's shape, dtype and device added after the affine, or None.
        activation: None or "relu", applied last.
        backend: the engine: None or "auto" (CUDA tensors: "triton" where usable, else "cuda";
            other devices: "torch"), or one of packed_kernels.BACKENDS ("torch", "triton",
            "cuda", "simt"; see grouped_conv2d). A backend that cannot run the call raises
            BackendUnavailableError before any launch.

    Returns:
        A tensor of input's shape, dtype and memory format. Batch statistics are computed in
        float32 (float64 for float64 input).

    Raises:
        TypeError, ValueError naming the argument, BackendUnavailableError; before any
        launch."""
    op = "batch_norm"
    check_float_tensor(op, "input", input, min_dim=2, allow_empty_batch=True)
    check_activation(op, "activation", activation)
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{op}: {name} must have shape ({channels},), got {tuple(t.shape)}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
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
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise TypeError(f"{op}: eps must be a finite float, got {eps!r}")
    if training and eps <= 0:  # as torch (every backend: the kernels would answer NaN/inf)
        raise ValueError(f"{op}: eps must be positive during training, got {eps}")
    if training and running_mean is not None and (
            isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"{op}: momentum must be a float when running statistics are updated, got "
                        f"{momentum!r} (nn.BatchNorm2d's momentum=None cumulative average is the "
                        "module's: pass it 1 / num_batches_tracked)")
    if training and 0 < input.numel() // channels <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input "
                         f"of shape {tuple(input.shape)}")
    chosen = _backend.resolve(op, backend, input.device, input.dtype, IMPLEMENTED)
    if input.shape[0] == 0:  # torch's answer: an empty output, running statistics unchanged
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training, 0.0, eps)
        out = out if residual is None else out + residual
        return torch.relu(out) if activation == "relu" else out
    stats = (None, None) if training else (running_mean, running_var)
    out, batch_mean, batch_var, _invstd = _batch_norm_op(
        input, *stats, weight, bias, residual, bool(training), float(eps), activation, chosen)
    if training and running_mean is not None:
        with torch.no_grad():  # as torch: running = (1 - momentum) * running + momentum * batch
            running_mean.mul_(1.0 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum)
    return out
