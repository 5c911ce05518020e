"""Block-diagonal grouped 2-D convolution with the semantics of torch.nn.functional.conv2d."""

from __future__ import annotations

import os
from functools import lru_cache, partial
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _alloc, _backend, dispatch
from .._checks import ValidatedCalls, check_float_tensor, check_positive_int, check_same_device_dtype
from .._tile_stats import merge_tile_moments
from .._layouts import format_of, kernel_weight
from ._autograd import library_op, unaliased

IntPair = Union[int, Sequence[int]]
IMPLEMENTED = ("torch", "triton", "cuda", "simt")


def _pair(op: str, name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)):
        pair = tuple(value)
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def conv_geometry(op: str, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                  dilation, groups):
    """Validate a conv2d call; returns (stride, padding4, dilation) with padding as
    (top, bottom, left, right) so "same" with an even kernel is exact, as in torch."""
    check_float_tensor(op, "input", input, min_dim=4, allow_empty_batch=True)
    check_float_tensor(op, "weight", weight, min_dim=4)
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}: input must be (N, C, H, W) and weight (C_out, C_in/groups, kH, kW), "
                         f"got {tuple(input.shape)} and {tuple(weight.shape)}")
    check_same_device_dtype(op, "input", input, weight=weight, bias=bias)
    groups = check_positive_int(op, "groups", groups)
    c_in, c_out = input.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups:
        raise ValueError(f"{op}: in_channels ({c_in}) and out_channels ({c_out}) must both be "
                         f"divisible by groups ({groups})")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"{op}: weight of shape {tuple(weight.shape)} expects "
                         f"{weight.shape[1] * groups} input channels with groups={groups}, "
                         f"input has {c_in}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    stride = _pair(op, "stride", stride, 1)
    dilation = _pair(op, "dilation", dilation, 1)
    kernel = weight.shape[2:]
    if isinstance(padding, str):
        if padding == "valid":
            padding4 = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            padding4 = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
        else:
            raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    else:
        ph, pw = _pair(op, "padding", padding, 0)
        padding4 = (ph, ph, pw, pw)
    out_h = (input.shape[2] + padding4[0] + padding4[1] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (input.shape[3] + padding4[2] + padding4[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: input of spatial size {tuple(input.shape[2:])} is too small for a "
                         f"{tuple(kernel)} kernel with dilation {dilation} and padding {padding!r}")
    return stride, padding4, dilation


def reference_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    top, bottom, left, right = padding
    if top != bottom or left != right:  # "same" with an even kernel: pad the extra row/col first
        input = F.pad(input, (left, right, top, bottom))
        top = left = 0
    return F.conv2d(input, weight, bias, tuple(stride), (top, left), tuple(dilation), groups)


def reference_conv2d_backward(grad: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                              groups: int, output_mask: Sequence[bool] = (True, True)):
    """(grad_input, grad_weight, grad_bias) in closed form; entries not in output_mask are None."""
    top, bottom, left, right = padding
    padded = input
    if top != bottom or left != right:
        padded = F.pad(input, (left, right, top, bottom))
        pad_hw = (0, 0)
    else:
        pad_hw = (top, left)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, padded, weight, [weight.shape[0]] if has_bias else None, list(stride), list(pad_hw),
        list(dilation), False, [0, 0], groups, [output_mask[0], output_mask[1], has_bias])
    if grad_input is not None:
        if padded is not input:
            grad_input = grad_input[:, :, top:top + input.shape[2], left:left + input.shape[3]]
        grad_input = grad_input.contiguous(memory_format=format_of(input))
    return grad_input, grad_weight, grad_bias


def _output_hw(input_hw, weight: Tensor, stride, padding, dilation):
    kh, kw = weight.shape[2:]
    out_h = (input_hw[0] + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (input_hw[1] + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out_h, out_w


# ---------------------------------------------------------------------------------------------
# fusion hooks: prologue act(x * in_scale + in_shift) per input channel, epilogue
# act(y * out_scale + out_shift + residual) per output channel (torch reference semantics)
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = (None, "relu")


def _per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def _activate(x: Tensor, activation: Optional[str]) -> Tensor:
    return torch.relu(x) if activation == "relu" else x


def reference_prologue(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                       activation: Optional[str]) -> Tensor:
    """x_hat = act(x * scale + shift); the conv then zero-pads x_hat (padding stays zero)."""
    dtype = x.dtype  # float32 scale/shift with 16-bit x: computed in float32, x_hat in x's dtype
    if scale is not None:
        x = x * _per_channel(scale)
    if shift is not None:
        x = x + _per_channel(shift)
    return _activate(x, activation).to(dtype)


def reference_epilogue(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                       residual: Optional[Tensor], activation: Optional[str]) -> Tensor:
    dtype = y.dtype
    if scale is not None:
        y = y * _per_channel(scale)
    if shift is not None:
        y = y + _per_channel(shift)
    if residual is not None:
        y = y + residual
    return _activate(y, activation).to(dtype)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_channel_stats(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of y over (N, H, W), fp32 (fp64 for fp64)."""
    var, mean = torch.var_mean(y.to(_stats_dtype(y.dtype)), (0, 2, 3), correction=0)
    return mean, var


# ---------------------------------------------------------------------------------------------
# the csrc kernels (backend "cuda": packed_kernels._C, "simt": the same source on the emulator)
#
# Layout transform at this boundary: the kernels read and write channels_last (NHWC) only, with
# the weight as (C_out, KH, KW, C_in/groups). NCHW or strided tensors are copied to
# channels_last here, and an NCHW caller gets its output copied back to NCHW, so every backend
# keeps the input's memory format; channels_last callers pay no copy but the weight's (small).
# ---------------------------------------------------------------------------------------------

_CSRC_EXTENSIONS = {"cuda": "_C", "simt": "_simt"}
_ACTIVATION_CODES = {None: 0, "relu": 1}  # pk::conv::Activation


def _nhwc(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous(memory_format=torch.channels_last)


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """Per-channel vectors go to the kernels as float32, whatever the activations' dtype."""
    return None if t is None else t.to(torch.float32).contiguous()


def csrc_conv_forward(backend, input, weight, bias, stride, padding, dilation, groups,
                      prologue=(None, None, None), epilogue=(None, None, None, None),
                      channel_stats=False):
    """(out, mean, var) like _conv_forward, on the csrc kernels."""
    ext = _backend.extension(_CSRC_EXTENSIONS[backend])
    in_scale, in_shift, in_activation = prologue
    out_scale, out_shift, residual, activation = epilogue
    x = _nhwc(input)
    n, c_out = input.shape[0], weight.shape[0]
    out_h, out_w = _output_hw(input.shape[2:], weight, stride, padding, dilation)
    y = _alloc.empty((n, c_out, out_h, out_w), x, memory_format=torch.channels_last)
    stats = None
    if channel_stats:  # one fp32 (sum, M2) partial per row tile, merged here (deterministic)
        stats = _alloc.empty((ext.conv_forward_row_tiles(n, out_h, out_w), 2, c_out), x,
                             dtype=torch.float32)
    ext.conv_forward(x, kernel_weight(weight, backend), _vector(bias), _vector(in_scale),
                     _vector(in_shift), _ACTIVATION_CODES[in_activation], _vector(out_scale),
                     _vector(out_shift), _nhwc(residual), _ACTIVATION_CODES[activation], list(stride),
                     [padding[0], padding[2]], list(dilation), groups, y, stats)
    out = y.contiguous(memory_format=format_of(input))
    if stats is None:
        return out, None, None
    return (out, *merge_tile_moments(stats[:, 0], stats[:, 1], n * out_h * out_w,
                                     ext.conv_forward_rows_per_tile()))


def csrc_conv_input_grad(backend, grad, weight, input_shape, stride, padding, dilation, groups,
                         memory_format=torch.contiguous_format):
    """d loss / d (conv input) on the csrc kernels, in `memory_format`."""
    ext = _backend.extension(_CSRC_EXTENSIONS[backend])
    grad_input = _alloc.empty(tuple(input_shape), grad, memory_format=torch.channels_last)
    ext.conv_input_grad(_nhwc(grad), kernel_weight(weight, backend), list(stride),
                        [padding[0], padding[2]], list(dilation), groups, grad_input)
    return grad_input.contiguous(memory_format=memory_format)


def csrc_conv_weight_grad(backend, grad, input, weight_shape, stride, padding, dilation, groups,
                          prologue=(None, None, None), splits: Optional[int] = None):
    """d loss / d weight on the csrc kernels, reading the input through the prologue; the pixel
    range is split into `splits` fp32 slabs (the kernels' heuristic when None), summed here."""
    ext = _backend.extension(_CSRC_EXTENSIONS[backend])
    in_scale, in_shift, in_activation = prologue
    c_out, cin_g, kh, kw = weight_shape
    n, c_in = input.shape[:2]
    out_h, out_w = grad.shape[2:]
    if splits is None:
        splits = ext.conv_weight_grad_splits(n, c_in, c_out, kh, kw, out_h, out_w, groups)
    partials = _alloc.empty((splits, c_out, kh, kw, cin_g), input, dtype=torch.float32)
    ext.conv_weight_grad(_nhwc(grad), _nhwc(input), _vector(in_scale), _vector(in_shift),
                         _ACTIVATION_CODES[in_activation], list(stride), [padding[0], padding[2]],
                         list(dilation), groups, partials)
    return partials.sum(0).permute(0, 3, 1, 2).to(input.dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# the three convolution primitives, per backend (the ops below are written on these)
# ---------------------------------------------------------------------------------------------

_NO_PROLOGUE, _NO_EPILOGUE = (None, None, None), (None, None, None, None)


def _prologue(in_scale, in_shift, in_activation) -> tuple:
    if in_scale is None and in_shift is None and in_activation is None:
        return _NO_PROLOGUE  # the identity: the torch backend then skips the reference pass
    return in_scale, in_shift, in_activation


def _epilogue(out_scale, out_shift, residual, activation) -> tuple:
    if not _has_epilogue(out_scale, out_shift, residual, activation):
        return _NO_EPILOGUE
    return out_scale, out_shift, residual, activation


def _conv_forward(backend, input, weight, bias, stride, padding, dilation, groups,
                  prologue=_NO_PROLOGUE, epilogue=_NO_EPILOGUE, channel_stats=False):
    """(out, mean, var) of act(conv(prologue(x)) + bias) ...: mean and biased variance of the
    pre-epilogue y per output channel (fp32, fp64 for fp64), None if not asked."""
    if backend == "torch":
        fmt = format_of(input)
        if prologue is not _NO_PROLOGUE:
            input = reference_prologue(input, *prologue)
        y = reference_conv2d(input, weight, bias, stride, padding, dilation, groups)
        mean, var = reference_channel_stats(y) if channel_stats else (None, None)
        if epilogue is not _NO_EPILOGUE:
            y = reference_epilogue(y, *epilogue)
        return y.contiguous(memory_format=fmt), mean, var
    if backend == "triton":
        from ..triton import conv as tc
        return tc.conv_forward(input, weight, bias, stride, padding, dilation, groups,
                               format_of(input), tc.Prologue(*prologue), tc.Epilogue(*epilogue),
                               channel_stats)
    return csrc_conv_forward(backend, input, weight, bias, stride, padding, dilation, groups,
                             prologue, epilogue, channel_stats)


def _conv_grads(backend, grad, input, weight, stride, padding, dilation, groups,
                prologue=(None, None, None), need_input=True, need_weight=True):
    """(d/d x_hat, d/d weight) of conv(x_hat, weight), x_hat = prologue(input); None if not needed."""
    if backend == "triton":
        from ..triton import conv as tc
        grad_x_hat = grad_weight = None
        if need_input:
            grad_x_hat = tc.conv_input_grad(grad, weight, input.shape, stride, padding, dilation,
                                            groups, format_of(input))
        if need_weight:
            grad_weight = tc.conv_weight_grad(grad, input, weight.shape, stride, padding, dilation,
                                              groups, tc.Prologue(*prologue))
        return grad_x_hat, grad_weight
    if backend in _CSRC_EXTENSIONS:
        grad_x_hat = grad_weight = None
        if need_input:
            grad_x_hat = csrc_conv_input_grad(backend, grad, weight, input.shape, stride, padding,
                                              dilation, groups, format_of(input))
        if need_weight:
            grad_weight = csrc_conv_weight_grad(backend, grad, input, weight.shape, stride, padding,
                                                dilation, groups, prologue)
        return grad_x_hat, grad_weight
    x_hat = reference_prologue(input, *prologue)
    grad_x_hat, grad_weight, _ = reference_conv2d_backward(
        grad, x_hat, weight, False, stride, padding, dilation, groups, (need_input, need_weight))
    return grad_x_hat, grad_weight


# ---------------------------------------------------------------------------------------------
# backend "auto" on CUDA tensors: each pass measured once per kind of call (packed_kernels.dispatch)
# ---------------------------------------------------------------------------------------------

AUTO = "auto"
_AUTO_ENGINES = ("torch", "triton", "cuda")
_usable_engines: dict = {}


def _usable(device: torch.device, dtype: torch.dtype) -> tuple:
    key = (device, dtype)
    if key not in _usable_engines:
        _usable_engines[key] = tuple(e for e in _AUTO_ENGINES if e in IMPLEMENTED and
                                     _backend.unavailable_reason(e, device, dtype) is None)
    return _usable_engines[key]


def _engines_for(input: Tensor) -> tuple:
    return _usable(input.device, input.dtype)


@lru_cache(maxsize=None)
def _versions() -> str:
    """Library versions in every decision's key: an upgrade measures again."""
    parts = [f"torch={torch.__version__}", f"cudnn={torch.backends.cudnn.version()}"]
    try:
        import triton
        parts.append(f"triton={triton.__version__}")
    except ImportError:
        pass
    from .. import __version__
    return ",".join(parts + [f"packed_kernels={__version__}"])


def _measured_engine(conv_pass: str, trial, input: Tensor, weight: Tensor, stride, padding, dilation,
                     groups: int, options: tuple = ()) -> str:
    """The engine measured fastest (among those agreeing with cuDNN) for this pass on this kind of
    call: the GPU, dtype, layout, weight shape, groups and geometry exactly, the output pixel
    count to the next power of two (batch and map size share a decision), fusion `options`."""
    out_h, out_w = _output_hw(input.shape[2:], weight, stride, padding, dilation)
    pixels = 1 << max(input.shape[0] * out_h * out_w - 1, 0).bit_length()
    key = (conv_pass, _backend.device_name(input.device), str(input.dtype)[6:],
           "channels_last" if format_of(input) == torch.channels_last else "nchw",
           tuple(weight.shape), groups, tuple(stride), tuple(padding), tuple(dilation),
           pixels, *options)
    if torch.compiler.is_compiling() or type(input) not in (Tensor, torch.nn.Parameter):
        return _known_engine(key, input.device, input.dtype)  # tracing: what is known, nothing run
    return dispatch.DISPATCHER.choose(key + (_versions(),), _engines_for(input), trial, dispatch.agree)


@torch.compiler.assume_constant_result
def _known_engine(key: tuple, device: torch.device, dtype: torch.dtype) -> str:
    return dispatch.DISPATCHER.known(key + (_versions(),), _usable(device, dtype))


def _auto_forward_engine(input, weight, bias, stride, padding, dilation, groups) -> str:
    return _measured_engine("forward", lambda engine: _conv_forward(
        engine, input, weight, bias, stride, padding, dilation, groups)[0],
        input, weight, stride, padding, dilation, groups)


def _grad_engines(grad, input, weight, stride, padding, dilation, groups, prologue, need_input,
                  need_weight, options: tuple = ()) -> Tuple[Optional[str], Optional[str]]:
    """(input-gradient engine, weight-gradient engine) for backend "auto", each measured."""
    geometry = (stride, padding, dilation, groups)
    input_engine = weight_engine = None
    if need_input:
        input_engine = _measured_engine("input_grad", lambda engine: _conv_grads(
            engine, grad, input, weight, *geometry, need_weight=False)[0], input, weight, *geometry)
    if need_weight:
        weight_engine = _measured_engine("weight_grad", lambda engine: _conv_grads(
            engine, grad, input, weight, *geometry, prologue, need_input=False)[1],
            input, weight, *geometry, options)
    return input_engine, weight_engine


def _conv_grads_by_pass(engines, grad, input, weight, stride, padding, dilation, groups,
                        prologue=_NO_PROLOGUE):
    """_conv_grads with the input and weight gradients on their own engines (None: not needed)."""
    input_engine, weight_engine = engines
    if input_engine is None or weight_engine is None or input_engine == weight_engine:
        engine = input_engine or weight_engine
        if engine is None:
            return None, None
        return _conv_grads(engine, grad, input, weight, stride, padding, dilation, groups, prologue,
                           input_engine is not None, weight_engine is not None)
    geometry = (stride, padding, dilation, groups)
    grad_x_hat = grad_weight = None
    if input_engine is not None:
        grad_x_hat = _conv_grads(input_engine, grad, input, weight, *geometry, need_weight=False)[0]
    if weight_engine is not None:
        grad_weight = _conv_grads(weight_engine, grad, input, weight, *geometry, prologue,
                                  need_input=False)[1]
    return grad_x_hat, grad_weight


# ---------------------------------------------------------------------------------------------
# grouped_conv2d: custom op + fake + autograd
# ---------------------------------------------------------------------------------------------

@library_op("packed_kernels::grouped_conv2d")
@_backend.on_input_device
def _grouped_conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int], groups: int, backend: str) -> Tensor:
    if backend == AUTO:
        backend = _auto_forward_engine(input, weight, bias, stride, padding, dilation, groups)
    out, _, _ = _conv_forward(backend, input, weight, bias, stride, padding, dilation, groups)
    return out


@_grouped_conv2d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, backend):
    out_h, out_w = _output_hw(input.shape[2:], weight, stride, padding, dilation)
    return torch.empty((input.shape[0], weight.shape[0], out_h, out_w), dtype=input.dtype,
                       device=input.device, memory_format=format_of(input))


@library_op("packed_kernels::grouped_conv2d_backward")
@_backend.on_input_device
def _grouped_conv2d_backward_op(grad: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                groups: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    engines = (backend, backend)
    if backend == AUTO:
        engines = _grad_engines(grad, input, weight, stride, padding, dilation, groups,
                                _NO_PROLOGUE, True, True)
    if engines == ("torch", "torch"):  # one cuDNN call for both, with the bias gradient
        grads = reference_conv2d_backward(grad, input, weight, has_bias, stride, padding, dilation,
                                          groups)
    else:
        grad_input, grad_weight = _conv_grads_by_pass(engines, grad, input, weight, stride,
                                                      padding, dilation, groups)
        grads = (grad_input, grad_weight, grad.sum((0, 2, 3)) if has_bias else None)
    return unaliased(grads, (grad, input, weight), input)


@_grouped_conv2d_backward_op.register_fake
def _(grad, input, weight, has_bias, stride, padding, dilation, groups, backend):
    return (torch.empty_like(input, memory_format=format_of(input)), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if has_bias else 0))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, backend = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups, backend)


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = _grouped_conv2d_backward_op(
        grad, input, weight, ctx.has_bias, *ctx.args)
    return grad_input, grad_weight, (grad_bias if ctx.has_bias else None), None, None, None, None, None


_grouped_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# fused_conv2d: custom op + fake + autograd
# ---------------------------------------------------------------------------------------------

@library_op("packed_kernels::fused_conv2d")
@_backend.on_input_device
def _fused_conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                     in_shift: Optional[Tensor], out_scale: Optional[Tensor],
                     out_shift: Optional[Tensor], residual: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int,
                     in_activation: Optional[str], activation: Optional[str], channel_stats: bool,
                     backend: str) -> tuple[Tensor, Tensor]:
    """(out, stats): stats is (2, C_out) [mean; biased variance] of the pre-epilogue y, or
    (0, C_out) when not asked (a custom op returns a fixed structure)."""
    prologue = _prologue(in_scale, in_shift, in_activation)
    epilogue = _epilogue(out_scale, out_shift, residual, activation)
    if backend == AUTO:
        backend = _fused_forward_engine(input, weight, bias, stride, padding, dilation, groups,
                                        prologue, epilogue, channel_stats)
    out, mean, var = _conv_forward(backend, input, weight, bias, stride, padding, dilation, groups,
                                   prologue, epilogue, channel_stats)
    if channel_stats:
        stats = torch.stack((mean, var))
    else:
        stats = input.new_empty((0, weight.shape[0]), dtype=_stats_dtype(input.dtype))
    return unaliased((out, stats), (input, weight, bias, in_scale, in_shift, out_scale,
                                    out_shift, residual), input)


@_fused_conv2d_op.register_fake
def _(input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, stride, padding,
      dilation, groups, in_activation, activation, channel_stats, backend):
    out_h, out_w = _output_hw(input.shape[2:], weight, stride, padding, dilation)
    out = torch.empty((input.shape[0], weight.shape[0], out_h, out_w), dtype=input.dtype,
                       device=input.device, memory_format=format_of(input))
    stats = input.new_empty((2 if channel_stats else 0, weight.shape[0]), dtype=_stats_dtype(input.dtype))
    return out, stats


def _fused_forward_engine(input, weight, bias, stride, padding, dilation, groups, prologue,
                          epilogue, channel_stats) -> str:
    options = (_options(prologue), _options(epilogue), f"stats={channel_stats}")
    return _measured_engine("fused_forward", lambda engine: _conv_forward(
        engine, input, weight, bias, stride, padding, dilation, groups, prologue, epilogue,
        channel_stats), input, weight, stride, padding, dilation, groups, options)


def _options(hooks: tuple) -> str:
    """Which fusion hooks are given (in a measured decision's key)."""
    return "".join("-" if v is None else "x" for v in hooks)


def _has_epilogue(out_scale, out_shift, residual, activation) -> bool:
    return not (out_scale is None and out_shift is None and residual is None and activation is None)


@library_op("packed_kernels::fused_conv2d_backward")
@_backend.on_input_device
def _fused_conv2d_backward_op(
        grad_out: Tensor, grad_stats: Tensor, out: Tensor, input: Tensor,
        weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
        out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
        in_activation: Optional[str], activation: Optional[str], channel_stats: bool, backend: str,
        need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (out, mean y, var y) for y = conv(x_hat) + bias, x_hat = act(x s + b),
    out = act(y s' + b' + r). The convolutions run on `backend`; the per-channel glue (masks,
    the stats gradient, per-channel sums) runs as two fused Triton passes on CUDA tensors when
    Triton is usable (whatever the conv backend), else in torch (_epilogue_glue/_prologue_glue).
    Returns (input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual) grads,
    empty where that argument was None."""
    epilogue = _has_epilogue(out_scale, out_shift, residual, activation)
    prologue = _prologue(in_scale, in_shift, in_activation)
    forward_backend = backend
    if backend == AUTO:  # the forward's decision, to recompute y as the forward computed it
        forward_backend = _fused_forward_engine(
            input, weight, bias, stride, padding, dilation, groups, prologue,
            _epilogue(out_scale, out_shift, residual, activation), channel_stats)
    triton_glue = _use_triton_glue(input)
    y = mean_y = None
    if out_scale is not None or channel_stats:
        if epilogue:  # recompute the pre-epilogue output rather than keep it alive
            # the kernel backends fuse y's statistics into the conv: the Triton glue's centring
            # mean then costs no extra pass over y
            fused_mean = triton_glue and channel_stats and forward_backend != "torch"
            y, mean_y, _ = _conv_forward(forward_backend, input, weight, bias, stride, padding,
                                         dilation, groups, prologue, channel_stats=fused_mean)
        else:
            y = out
    if triton_glue:
        from ..triton import conv_glue
        grad_y_conv, grad_residual, sum_grad_y, sum_grad_zy, sum_grad_z = conv_glue.epilogue_backward(
            grad_out, out, y, out_scale, grad_stats if channel_stats else None, residual,
            activation == "relu", need_sums=bias is not None or out_shift is not None, mean=mean_y)
    else:
        grad_y_conv, grad_residual, sum_grad_y, sum_grad_zy, sum_grad_z = _epilogue_glue(
            grad_out, out, y, out_scale, grad_stats if channel_stats else None, residual,
            activation, input.dtype, bias is not None, out_shift is not None)
    geometry = (stride, padding, dilation, groups)
    if backend == AUTO:
        engines = _grad_engines(grad_y_conv, input, weight, *geometry, prologue, need_input,
                                need_weight, (_options(prologue),))
    else:
        engines = (backend if need_input else None, backend if need_weight else None)
    grad_x_hat, grad_weight = _conv_grads_by_pass(engines, grad_y_conv, input, weight, *geometry,
                                                  prologue)

    grad_input = sum_grad_ux = sum_grad_u = None
    if grad_x_hat is not None:
        glue = conv_glue.prologue_backward if triton_glue else _prologue_glue
        grad_input, sum_grad_ux, sum_grad_u = glue(grad_x_hat, input, in_scale, in_shift,
                                                   in_activation == "relu")

    def cast(total, like):
        return None if like is None or total is None else total.to(like.dtype)

    grads = (grad_input, grad_weight, cast(sum_grad_y, bias), cast(sum_grad_ux, in_scale),
             cast(sum_grad_u, in_shift), cast(sum_grad_zy, out_scale), cast(sum_grad_z, out_shift),
             grad_residual)
    return unaliased(grads, (grad_out, grad_stats, out, input, weight, bias, in_scale,
                             in_shift, out_scale, out_shift, residual), input)


# Forces the Triton glue wherever Triton can run, the interpreter on the CPU included (tests).
FORCE_TRITON_GLUE = os.environ.get("PACKED_KERNELS_TRITON_GLUE", "0") not in ("", "0")


def _use_triton_glue(input: Tensor) -> bool:
    if input.device.type != "cuda" and not FORCE_TRITON_GLUE:
        return False
    return _backend.unavailable_reason("triton", input.device, input.dtype) is None


def _epilogue_glue(grad_out, out, y, out_scale, grad_stats, residual, activation, dtype,
                   need_sum_grad_y=True, need_sum_grad_z=True):
    """Torch reference of conv_glue.epilogue_backward: (grad_y in `dtype`, grad_residual,
    sum grad_y, sum grad_z * y, sum grad_z), sums in fp32 (fp64 for fp64)."""
    compute = _stats_dtype(dtype)
    reduce = (0, 2, 3)
    grad_z = grad_out.to(compute)
    if activation == "relu":  # torch's relu backward: 0 where out <= 0 (a NaN out passes)
        grad_z = torch.where(out <= 0, 0.0, grad_z)
    if y is not None:
        y = y.to(compute)
    grad_y = grad_z if out_scale is None else grad_z * _per_channel(out_scale.to(compute))
    if grad_stats is not None:  # d mean/dy = 1/n, d var/dy = 2 (y - mean)/n per channel
        grad_mean, grad_var = grad_stats.to(compute)
        count = y.numel() // y.shape[1]
        centred = y - y.mean(reduce, keepdim=True)
        grad_y = grad_y + _per_channel(grad_mean / count) + centred * _per_channel(2 * grad_var / count)
    grad_residual = None
    if residual is not None:
        grad_residual = grad_z.to(residual.dtype).contiguous(memory_format=format_of(residual))
    return (grad_y.to(dtype), grad_residual, grad_y.sum(reduce) if need_sum_grad_y else None,
            None if out_scale is None else (grad_z * y).sum(reduce),
            grad_z.sum(reduce) if need_sum_grad_z else None)


def _prologue_glue(grad_x_hat, input, in_scale, in_shift, relu):
    """Torch reference of conv_glue.prologue_backward: (grad_input, sum grad_u * x,
    sum grad_u), grad_u = grad_x_hat masked by x s + b > 0 under relu."""
    compute = _stats_dtype(input.dtype)
    reduce = (0, 2, 3)
    grad_u = grad_x_hat
    if relu or in_scale is not None or in_shift is not None:
        grad_u = grad_x_hat.to(compute)
    if relu:  # recompute u = x s + b rather than store it
        u = reference_prologue(input.to(compute), *(None if t is None else t.to(compute)
                                                    for t in (in_scale, in_shift)), None)
        grad_u = torch.where(u <= 0, 0.0, grad_u)
    grad_input = grad_u if in_scale is None else grad_u * _per_channel(in_scale.to(compute))
    grad_input = grad_input.to(input.dtype).contiguous(memory_format=format_of(input))
    return (grad_input, None if in_scale is None else (grad_u * input.to(compute)).sum(reduce),
            None if in_shift is None else grad_u.sum(reduce))


@_fused_conv2d_backward_op.register_fake
def _(grad_out, grad_stats, out, input, weight, bias, in_scale, in_shift, out_scale,
      out_shift, residual, stride, padding, dilation, groups, in_activation, activation,
      channel_stats, backend, need_input, need_weight):
    def like(t, needed=True, fmt=torch.preserve_format):
        return torch.empty_like(t, memory_format=fmt) if t is not None and needed else input.new_empty(0)
    return (like(input, need_input, format_of(input)), like(weight, need_weight), like(bias),
            like(in_scale, need_input), like(in_shift, need_input), like(out_scale), like(out_shift),
            like(residual, True, format_of(residual) if residual is not None else None))


def _fused_setup_context(ctx, inputs, output):
    (input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, stride, padding,
     dilation, groups, in_activation, activation, channel_stats, backend) = inputs
    ctx.save_for_backward(output[0], input, weight, bias, in_scale, in_shift, out_scale, out_shift,
                          residual)
    ctx.args = (stride, padding, dilation, groups, in_activation, activation, channel_stats, backend)


def _fused_backward(ctx, grad_out, grad_stats):
    out, input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual = ctx.saved_tensors
    channels = weight.shape[0]
    stats_dtype = _stats_dtype(input.dtype)
    channel_stats = ctx.args[6]
    # Autograd passes None for outputs that got no gradient: they contribute zero.
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_stats is None or not channel_stats:
        grad_stats = out.new_zeros((2 if channel_stats else 0, channels), dtype=stats_dtype)
    grads = _fused_conv2d_backward_op(
        grad_out, grad_stats, out, input, weight, bias, in_scale, in_shift, out_scale,
        out_shift, residual, *ctx.args, need_input=bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
                                                      or ctx.needs_input_grad[4]),
        need_weight=bool(ctx.needs_input_grad[1]))
    present = (input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual)
    result = [g if t is not None and g.numel() > 0 else None for g, t in zip(grads, present)]
    return (*result, None, None, None, None, None, None, None, None)


_fused_conv2d_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ---------------------------------------------------------------------------------------------
# backend choice and public functions
# ---------------------------------------------------------------------------------------------

def choose_backend(op: str, backend: Optional[str], input: Tensor, weight: Tensor, stride, groups: int) -> str:
    """backend=None/"auto": "auto" on CUDA tensors (the op measures the engines on first use of
    each kind of call and keeps the fastest that agrees with cuDNN; see packed_kernels.dispatch),
    the torch reference elsewhere; explicit backends as asked. An empty batch has nothing to
    compute: torch answers it, with its empty output and gradients."""
    if input.shape[0] == 0:
        if not (backend is None or backend == AUTO or backend in _backend.BACKENDS):
            _backend.resolve(op, backend, input.device, input.dtype, IMPLEMENTED)  # names the bad value
        return "torch"
    if backend is None or backend == AUTO:
        return AUTO if input.device.type == "cuda" else "torch"
    return _backend.resolve(op, backend, input.device, input.dtype, IMPLEMENTED)


def grouped_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                   padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
                   backend: Optional[str] = None) -> Tensor:
    """torch.nn.functional.conv2d semantics, block-diagonal over `groups`."""
    op = "grouped_conv2d"
    stride, padding4, dilation = _validated_grouped_call(input, weight, bias, stride, padding,
                                                         dilation, groups)
    chosen = choose_backend(op, backend, input, weight, stride, groups)
    return _grouped_conv2d_op(input, weight, bias, list(stride), list(padding4), list(dilation),
                              groups, chosen)


def _check_channel_vector(op: str, name: str, value, channels: int, input: Tensor) -> None:
    if value is None:
        return
    check_float_tensor(op, name, value)
    if value.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16):
        # float32 vectors with 16-bit activations (folded BatchNorm statistics keep their
        # precision, and so do their gradients)
        check_same_device_dtype(op, "input", input.new_empty(0, dtype=torch.float32), **{name: value})
    else:
        check_same_device_dtype(op, "input", input, **{name: value})
    if tuple(value.shape) != (channels,):
        raise ValueError(f"{op}: {name} must have shape ({channels},), got {tuple(value.shape)}")


def _check_activation(op: str, name: str, value) -> None:
    if value not in ACTIVATIONS:
        raise ValueError(f"{op}: {name} must be one of {ACTIVATIONS}, got {value!r}")


def fused_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                 padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
                 in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
                 in_activation: Optional[str] = None, out_scale: Optional[Tensor] = None,
                 out_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 activation: Optional[str] = None, channel_stats: bool = False,
                 backend: Optional[str] = None):
    """out = act(y * out_scale + out_shift + residual), y = conv2d(x_hat, weight, bias, ...),
    x_hat = in_act(input * in_scale + in_shift) (per channel; the conv zero-pads x_hat, so
    this is conv(relu(bn(x))) with BN folded into in_scale/in_shift).

    Returns `out`, or with channel_stats=True `(out, mean, var)`: per output channel, the mean
    and biased (population) variance of y over (N, H, W) in fp32 (fp64 for fp64 input) —
    BatchNorm's batch statistics of y without reading it again, computed stably (per-tile
    two-pass M2 merged with Chan's formula; no E[y^2] - mean^2 cancellation when
    |mean| >> std). Differentiable in every tensor argument: the backward runs the conv
    gradients on the same backend, and the per-channel glue (activation masks, the statistics'
    gradient, grad_residual, grad_input, the vectors' gradients) as two fused Triton passes on
    CUDA tensors (triton/conv_glue.py), in torch on the CPU."""
    stride, padding4, dilation = _validated_fused_call(
        input, weight, bias, stride, padding, dilation, groups, in_scale, in_shift, in_activation,
        out_scale, out_shift, residual, activation, channel_stats)
    chosen = choose_backend("fused_conv2d", backend, input, weight, stride, groups)
    out, stats = _fused_conv2d_op(
        input, weight, bias, in_scale, in_shift, out_scale, out_shift, residual, list(stride),
        list(padding4), list(dilation), groups, in_activation, activation, channel_stats, chosen)
    return (out, *stats.unbind()) if channel_stats else out


def _check_fused_call(input, weight, bias, stride, padding, dilation, groups, in_scale, in_shift,
                      in_activation, out_scale, out_shift, residual, activation, channel_stats):
    """fused_conv2d's argument checks; returns (stride, padding4, dilation)."""
    op = "fused_conv2d"
    stride, padding4, dilation = conv_geometry(op, input, weight, bias, stride, padding, dilation, groups)
    for name, value in (("in_scale", in_scale), ("in_shift", in_shift)):
        _check_channel_vector(op, name, value, input.shape[1], input)
    for name, value in (("out_scale", out_scale), ("out_shift", out_shift)):
        _check_channel_vector(op, name, value, weight.shape[0], input)
    _check_activation(op, "in_activation", in_activation)
    _check_activation(op, "activation", activation)
    if not isinstance(channel_stats, bool):
        raise TypeError(f"{op}: channel_stats must be a bool, got {type(channel_stats).__name__}")
    out_hw = _output_hw(input.shape[2:], weight, stride, padding4, dilation)
    if residual is not None:
        check_float_tensor(op, "residual", residual)
        check_same_device_dtype(op, "input", input, residual=residual)
        expected = (input.shape[0], weight.shape[0], *out_hw)
        if tuple(residual.shape) != expected:
            raise ValueError(f"{op}: residual must have the output's shape {expected}, got "
                             f"{tuple(residual.shape)}")
    return stride, padding4, dilation


_validated_grouped_call = ValidatedCalls(partial(conv_geometry, "grouped_conv2d"))
_validated_fused_call = ValidatedCalls(_check_fused_call)
