# SPDX-License-Identifier: Apache-2.0
"""Conv2d -> BatchNorm2d -> [+ residual] -> ReLU as fused kernels: conv_bn_act() on existing
conv and batch-norm modules (what the models' blocks call), and ConvBNAct2d, a module holding
the pair.

Inference: BatchNorm is folded into the convolution's epilogue (per-channel scale and shift),
with the residual add and ReLU in the same kernel: one launch per block.

Training: the convolution's epilogue also returns the per-channel mean and biased variance of
its output (channel_stats, computed stably from per-tile M2s), which are the BatchNorm batch
statistics without another pass over the activation. BatchNorm + ReLU is then either
  - deferred (`defer=True`, no residual): it returns a DeferredBatchNorm (the raw conv output
    and its normalisation), which the next conv_bn_act / ConvBNAct2d applies in its convolution's
    prologue while loading, so the activation is written once and read once; or
  - applied in one elementwise pass (pk.batch_norm with the given statistics) together with the
    residual add and ReLU.
Gradients flow through all of it (the statistics included), so the result, its gradients and the
running statistics match the unfused modules.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.batch_norm import IMPLEMENTED as BATCH_NORM_BACKENDS
from ..ops.batch_norm import batch_norm
from .._layouts import WEIGHT_LAYOUT, strided_for
from ..ops.conv import choose_backend, fused_conv2d
from .batch_norm import BatchNorm2d
from .packed import PackedConv2d
from .packing import STOCK, autocast_operands


class DeferredBatchNorm:
    """A BatchNorm (+ activation) not applied yet: act((raw - mean) * invstd * weight + bias).

    The next conv_bn_act folds it into its prologue; materialize() applies it in one pass.
    conv_bn_act(..., defer=True) returns one; it is not built by hand.

    Args:
        raw: the conv output (N, C, H, W) the BatchNorm applies to.
        mean, var: (C,) the batch statistics (biased variance), float32 (float64 for float64).
        weight, bias: (C,) BatchNorm's affine, or None.
        eps: added to var.
        activation: None or "relu".
        backend: pk.batch_norm's `backend` for materialize()."""

    def __init__(self, raw: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, activation: Optional[str], backend: Optional[str]):
        self.raw, self.mean, self.var = raw, mean, var
        self.weight, self.bias, self.eps = weight, bias, eps
        self.activation, self.backend = activation, backend

    @property
    def shape(self):
        return self.raw.shape

    def scale_shift(self):
        """Per channel (scale, shift) with act(raw * scale + shift) the normalised output."""
        scale = torch.rsqrt(self.var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(scale.dtype)
        shift = -self.mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(scale.dtype)
        dtype = _vector_dtype(self.raw)
        return scale.to(dtype), shift.to(dtype)

    def materialize(self, residual: Optional[Tensor] = None) -> Tensor:
        return batch_norm(self.raw, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps,
                          residual=residual, activation=self.activation, backend=self.backend)


def _vector_dtype(x: Tensor) -> torch.dtype:
    """Per-channel vectors for fused_conv2d: float32 with 16-bit activations, else x's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _bn_backend(backend: Optional[str]) -> Optional[str]:
    """The conv's backend for the batch-norm pass where batch_norm has it (cuda/simt: the default)."""
    return backend if backend in BATCH_NORM_BACKENDS else None


def materialize(x: Union[Tensor, DeferredBatchNorm]) -> Tensor:
    return x.materialize() if isinstance(x, DeferredBatchNorm) else x


def fusable_conv(conv: nn.Module) -> bool:
    """Whether conv_bn_act can run `conv`: an nn.Conv2d (GroupedConv2d included) or a
    PackedConv2d that is not `last` (whose output is rearranged to estimator-major rows)."""
    if isinstance(conv, PackedConv2d):
        return not conv.last
    return isinstance(conv, nn.Conv2d)


def _conv_module_parts(conv: nn.Module):
    """(the nn.Conv2d holding weight/bias/geometry, the module's own backend)."""
    if not fusable_conv(conv):
        raise TypeError(f"conv_bn_act: conv must be an nn.Conv2d, GroupedConv2d or a PackedConv2d "
                        f"that is not `last`, got {type(conv).__name__}"
                        + (" with last=True" if isinstance(conv, PackedConv2d) else ""))
    inner = conv.conv if isinstance(conv, PackedConv2d) else conv
    return inner, getattr(conv, "backend", None)


def _batch_count(y: Tensor) -> int:
    """Values per channel of the conv output (BN's training statistics need more than one)."""
    count = y.numel() // y.shape[1]
    if count <= 1:
        raise ValueError(f"conv_bn_act: expected more than 1 value per channel when training, got "
                         f"a conv output of shape {tuple(y.shape)}")
    return count


def _stock(x, conv: nn.Module, bn: Optional[nn.Module], residual: Optional[Tensor],
           activation: Optional[str]) -> Tensor:
    """backend "stock": torch's own modules one after another (the speed table's baseline)."""
    out = conv(materialize(x))
    if bn is not None:
        out = nn.BatchNorm2d.forward(bn, out)  # F.batch_norm, whatever the module's class
    if residual is not None:
        out = out + residual
    return torch.relu(out) if activation == "relu" else out


def _on_torch(x: Tensor, inner: nn.Conv2d, bn: Optional[nn.Module], residual: Optional[Tensor],
              activation: Optional[str], padding) -> Tensor:
    """The block on torch's ops (backend None/"auto" and "torch"): cuDNN's convolution, one
    batch-norm pass, the residual add and ReLU in place, as stock blocks run (never more memory,
    no more launches); at inference inside reuse_inference_operands() BN is folded into the
    conv's weight and bias (one pass fewer). Why not the fused path by default: in eager mode a
    step is bound by the host, and the fused path's extra launches cost more host time than
    its kernels save (measured on an H200: bench/results/2026-12-04-nvidia-h200-dispatch/)."""
    if (bn is not None and _reuse_depth and not torch.is_grad_enabled() and not bn.training
            and bn.running_mean is not None):
        weight, bias = _folded_conv_operands(inner, bn, x)
        out = F.conv2d(x, weight, bias, inner.stride, padding, inner.dilation, inner.groups)
    else:
        out = F.conv2d(x, inner.weight, inner.bias, inner.stride, padding, inner.dilation,
                       inner.groups)
        if bn is not None:
            out = nn.BatchNorm2d.forward(bn, out)  # F.batch_norm, whatever the module's class
    if residual is not None:
        out += residual
    return out.relu_() if activation == "relu" else out


def conv_bn_act(x: Union[Tensor, DeferredBatchNorm], conv: nn.Module, bn: Optional[nn.BatchNorm2d],
                residual: Optional[Tensor] = None, activation: Optional[str] = "relu",
                defer: bool = False, *, backend: Optional[str] = None
                ) -> Union[Tensor, DeferredBatchNorm]:
    """act(bn(conv(x)) [+ residual]) on fused_conv2d, with existing modules' parameters/buffers.

    conv: an nn.Conv2d, GroupedConv2d or PackedConv2d (its inner conv's weight, bias and
    geometry; padding_mode and autocast handled as PackedConv2d does). bn: an nn.BatchNorm2d
    (packed_kernels' or torch's; its running statistics and num_batches_tracked move exactly as
    the module's own forward would move them), or None for conv [+ residual] -> act alone.
    x: a tensor or a DeferredBatchNorm, applied in this conv's prologue.
    Inference folds BN into the conv epilogue (one launch with the residual and activation);
    training takes the batch statistics from the conv epilogue and returns, with `defer`, a
    DeferredBatchNorm for the next conv's prologue, else applies BN [+ residual] + act in one
    batch-norm pass. backend: None uses the conv module's own (`.backend`, see set_backend);
    "stock" runs torch's modules unfused."""
    if activation not in (None, "relu"):
        raise ValueError(f"conv_bn_act: activation must be None or 'relu', got {activation!r}")
    if defer and residual is not None:
        raise ValueError("conv_bn_act: a residual cannot be deferred (it is not per-channel); "
                         "call with defer=False")
    inner, own_backend = _conv_module_parts(conv)
    backend = own_backend if backend is None else backend
    if bn is not None and bn.num_features != inner.out_channels:
        raise ValueError(f"conv_bn_act: the batch norm has {bn.num_features} features but the conv "
                         f"has {inner.out_channels} output channels")
    if backend == STOCK or x.shape[0] == 0:  # an empty batch: torch's modules answer it
        return _stock(x, conv, bn, residual, activation)
    padding = inner.padding
    if inner.padding_mode != "zeros":  # the prologue zero-pads: pad the normalised input instead
        x = F.pad(materialize(x), inner._reversed_padding_repeated_twice, mode=inner.padding_mode)
        padding = 0
    if backend is None or backend == "auto" or backend == "torch":
        return _on_torch(materialize(x), inner, bn, residual, activation, padding)
    raw = x.raw if isinstance(x, DeferredBatchNorm) else x
    raw, residual = autocast_operands(raw, residual)
    weight = autocast_operands(inner.weight)[0]
    engine = choose_backend("fused_conv2d", backend, raw, weight, inner.stride, inner.groups)
    geometry = dict(stride=inner.stride, padding=padding, dilation=inner.dilation, groups=inner.groups)
    prologue = {}
    if isinstance(x, DeferredBatchNorm):
        in_scale, in_shift = x.scale_shift()
        prologue = dict(in_scale=in_scale, in_shift=in_shift, in_activation=x.activation)
    geometry["backend"] = engine
    if bn is None:
        weight, bias = autocast_operands(inner.weight, inner.bias)
        return fused_conv2d(raw, weight, bias, **geometry, **prologue, residual=residual,
                            activation=activation)
    factor = BatchNorm2d.count_batch(bn)
    if not (bn.training or bn.running_mean is None):
        # inference: BN folded into the epilogue, with the residual and activation
        if _reuse_depth and not torch.is_grad_enabled():
            weight, bias, scale, shift = _inference_operands(inner, bn, raw, engine)
        else:
            weight, bias = autocast_operands(inner.weight, inner.bias)
            scale, shift = _folded_batch_norm(bn, _vector_dtype(raw))
        return fused_conv2d(raw, weight, bias, **geometry, **prologue, out_scale=scale,
                            out_shift=shift, residual=residual, activation=activation)
    # var is biased, as BN normalises with (stable: per-tile M2s merged by Chan's formula)
    weight, bias = autocast_operands(inner.weight, inner.bias)
    y, mean, var = fused_conv2d(raw, weight, bias, **geometry, **prologue, channel_stats=True)
    count = _batch_count(y)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():  # as torch.nn.BatchNorm2d, with the unbiased batch variance
            bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1.0 - factor).add_(
                (var * (count / (count - 1))).to(bn.running_var.dtype), alpha=factor)
    bn_backend = bn.backend if isinstance(bn, BatchNorm2d) else _bn_backend(backend)
    pending = DeferredBatchNorm(y, mean, var, bn.weight, bn.bias, bn.eps, activation, bn_backend)
    return pending if defer else pending.materialize(residual)


def _folded_batch_norm(bn: nn.BatchNorm2d, dtype: torch.dtype):
    """(scale, shift) with bn(y) = y * scale + shift from the running statistics."""
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


# Per batch-norm module, inside reuse_inference_operands(): (key, operands) of its last call.
# The key holds every tensor's storage and version, so an optimizer step, load_state_dict or
# .to() rebuilds them; a loop over batches pays the folding, cast and weight layout once.
_INFERENCE_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_reuse_depth = 0


@contextlib.contextmanager
def reuse_inference_operands():
    """Inside, eval-mode conv + BN blocks called without autograd keep their folded BatchNorm
    vectors and their weights cast and laid out for the kernels from one call to the next (a
    conv's launches are then its kernel alone), rebuilding them when a parameter or buffer is
    replaced or changed in place. In-place edits through `.data`, which torch does not count,
    are not seen: make them outside. Leaving the outermost block drops what was kept."""
    global _reuse_depth
    _reuse_depth += 1
    try:
        yield
    finally:
        _reuse_depth -= 1
        if not _reuse_depth:
            _INFERENCE_CACHE.clear()


def _inference_key(inner: nn.Conv2d, bn: nn.BatchNorm2d, raw: Tensor, dtype, *extra) -> tuple:
    """Every input of the kept operands: each tensor's storage and version, dtypes, modes."""
    tensors = (inner.weight, inner.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    return (dtype, raw.device, *extra, raw.is_contiguous(memory_format=torch.channels_last),
            torch.is_inference_mode_enabled(), bn.eps,
            *((None if t is None else (t.data_ptr(), t._version, t.dtype)) for t in tensors))


def _folded_conv_operands(inner: nn.Conv2d, bn: nn.BatchNorm2d, raw: Tensor):
    """(weight, bias) of the conv with BN folded in, bn(conv(x)) = conv'(x): weight * scale per
    output channel, bias * scale + shift (folded in float32, then cast to autocast's dtype or
    the weight's)."""
    device_type = raw.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else inner.weight.dtype)
    key = _inference_key(inner, bn, raw, dtype, "folded")
    cached = _INFERENCE_CACHE.get(bn)
    if cached is not None and cached[0] == key:
        return cached[1]
    fold_dtype = torch.promote_types(inner.weight.dtype, torch.float32)
    scale, shift = _folded_batch_norm(bn, fold_dtype)
    weight = inner.weight.to(fold_dtype) * scale.view(-1, 1, 1, 1)
    if inner.bias is not None:
        shift = shift + inner.bias.to(fold_dtype) * scale
    if raw.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)  # as cuDNN would convert it
    operands = (weight.to(dtype), shift.to(dtype))
    _INFERENCE_CACHE[bn] = (key, operands)
    return operands


def _inference_operands(inner: nn.Conv2d, bn: nn.BatchNorm2d, raw: Tensor, backend: Optional[str]):
    """(weight, bias, out_scale, out_shift) for an inference call inside
    reuse_inference_operands() without autograd: the conv's parameters (in autocast's dtype
    under autocast), the weight stored as the chosen conv backend's kernels read it, and BN
    folded into per-channel vectors."""
    dtype = raw.dtype if torch.is_autocast_enabled(raw.device.type) else inner.weight.dtype
    chosen = backend  # a kernel engine: conv_bn_act resolved it
    key = _inference_key(inner, bn, raw, dtype, chosen)
    cached = _INFERENCE_CACHE.get(bn)
    if cached is not None and cached[0] == key:
        return cached[1]
    weight = inner.weight.to(dtype)
    if chosen in WEIGHT_LAYOUT:
        weight = strided_for(weight, chosen)
    elif raw.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)  # as cuDNN would convert it
    bias = None if inner.bias is None else inner.bias.to(dtype)
    operands = (weight, bias, *_folded_batch_norm(bn, _vector_dtype(raw)))
    _INFERENCE_CACHE[bn] = (key, operands)
    return operands


class ConvBNAct2d(nn.Module):
    """Conv2d(bias=False by default) -> BatchNorm2d -> [+ residual] -> activation ("relu" or None).

    Holds `conv` (torch.nn.Conv2d) and `bn` (packed_kernels.nn.BatchNorm2d), so its state_dict is
    that of an unfused Conv2d + BatchNorm2d pair under the names conv.* and bn.*; from_modules()
    wraps an existing pair, and load_state_dict also takes a Sequential(conv, bn)'s 0.* / 1.*.
    forward(x, residual=None, defer=False): x is a tensor or the previous block's
    DeferredBatchNorm (see conv_bn_act).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            nn.Conv2d's (zero padding).
        eps, momentum, affine, track_running_stats: nn.BatchNorm2d's.
        activation: None or "relu", applied after the (optional) residual add.
        device, dtype: of the parameters and buffers.
        backend: fused_conv2d's `backend` (None: the op picks; "stock": torch's modules)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 activation: Optional[str] = "relu", device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__()
        if activation not in (None, "relu"):
            raise ValueError(f"ConvBNAct2d: activation must be None or 'relu', got {activation!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias, device=device, dtype=dtype)
        self.bn = BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device,
                              dtype=dtype, backend=_bn_backend(backend))
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str] = "relu", *,
                     backend: Optional[str] = None) -> "ConvBNAct2d":
        """Wraps an unfused pair (parameters and buffers shared, not copied)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"ConvBNAct2d: padding_mode must be 'zeros', got {conv.padding_mode!r}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"ConvBNAct2d: the batch norm has {bn.num_features} features but the conv "
                             f"has {conv.out_channels} output channels")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv = conv
        new.bn = bn if isinstance(bn, BatchNorm2d) else BatchNorm2d.from_batch_norm(bn, backend=backend)
        new.bn.backend = _bn_backend(backend)
        new.activation, new.backend = activation, backend
        return new.train(conv.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for theirs, ours in (("0.", "conv."), ("1.", "bn.")):  # nn.Sequential(conv, bn)
            for key in [k for k in state_dict if k.startswith(prefix + theirs)]:
                state_dict[prefix + ours + key[len(prefix + theirs):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Union[Tensor, DeferredBatchNorm], residual: Optional[Tensor] = None,
                defer: bool = False) -> Union[Tensor, DeferredBatchNorm]:
        return conv_bn_act(x, self.conv, self.bn, residual, self.activation, defer, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
