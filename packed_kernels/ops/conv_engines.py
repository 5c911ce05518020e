# SPDX-License-Identifier: Apache-2.0
"""The convolution engines behind `backend=` — torch (cuDNN), triton, cuda (the CUDA C++ kernels)
and simt (the same source on the CPU emulator) — as one table of forward / input-gradient /
weight-gradient functions with the fusion hooks, and backend "auto": each pass measured once
per kind of call on CUDA tensors (packed_kernels.dispatch)."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _alloc, _backend, dispatch
from .._conventions import ACTIVATION_CODES, fp32_vector
from .._layouts import format_of, kernel_weight, with_format_of
from .._tile_stats import merge_tile_moments
from .conv_reference import (output_hw, reference_channel_stats, reference_conv2d,
                             reference_conv2d_backward, reference_epilogue, reference_prologue)


# ---------------------------------------------------------------------------------------------
# the csrc kernels (backend "cuda": packed_kernels._C, "simt": the same source on the emulator)
#
# Layout transform at this boundary: the kernels read and write channels_last (NHWC) only, with
# the weight as (C_out, KH, KW, C_in/groups). NCHW or strided tensors are copied to
# channels_last here, and an NCHW caller gets its output copied back to NCHW, so every backend
# keeps the input's memory format; channels_last callers pay no copy but the weight's (small).
# ---------------------------------------------------------------------------------------------

_CSRC_EXTENSIONS = {"cuda": "_C", "simt": "_simt"}


def _allow_tf32(dtype: torch.dtype) -> bool:
    """fp32 may multiply on TF32 tensor cores where torch lets cuDNN (the kernels also need
    sm_80+): the rule the Triton conv follows too."""
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def _dense_nhwc(t: Optional[Tensor]) -> Optional[Tensor]:
    """The csrc kernels read dense channels_last tensors only."""
    return None if t is None else t.contiguous(memory_format=torch.channels_last)


def csrc_conv_forward(backend, input, weight, bias, stride, padding, dilation, groups,
                      prologue, epilogue, channel_stats):
    """ConvEngine.forward on the csrc kernels."""
    ext = _backend.extension(_CSRC_EXTENSIONS[backend])
    in_scale, in_shift, in_activation = prologue
    out_scale, out_shift, residual, activation = epilogue
    x = _dense_nhwc(input)
    n, c_out = input.shape[0], weight.shape[0]
    out_h, out_w = output_hw(input.shape[2:], weight, stride, padding, dilation)
    y = _alloc.empty((n, c_out, out_h, out_w), x, memory_format=torch.channels_last)
    stats = None
    if channel_stats:  # one fp32 (sum, M2) partial per row tile, merged here (deterministic)
        stats = _alloc.empty((ext.conv_forward_row_tiles(n, out_h, out_w), 2, c_out), x,
                             dtype=torch.float32)
    ext.conv_forward(x, kernel_weight(weight, backend), fp32_vector(bias), fp32_vector(in_scale),
                     fp32_vector(in_shift), ACTIVATION_CODES[in_activation], fp32_vector(out_scale),
                     fp32_vector(out_shift), _dense_nhwc(residual), ACTIVATION_CODES[activation], list(stride),
                     [padding[0], padding[2]], list(dilation), groups, y, stats, _allow_tf32(x.dtype))
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
    ext.conv_input_grad(_dense_nhwc(grad), kernel_weight(weight, backend), list(stride),
                        [padding[0], padding[2]], list(dilation), groups, grad_input, _allow_tf32(grad.dtype))
    return grad_input.contiguous(memory_format=memory_format)


def csrc_conv_weight_grad(backend, grad, input, weight_shape, stride, padding, dilation, groups,
                          prologue=(None, None, None), splits: Optional[int] = None,
                          memory_format=torch.contiguous_format):
    """d loss / d weight on the csrc kernels, reading the input through the prologue, in
    `memory_format` (the weight's: autograd then keeps it as the parameter's gradient without
    a copy); the pixel range is split into `splits` fp32 slabs (the kernels' heuristic when
    None), summed here."""
    ext = _backend.extension(_CSRC_EXTENSIONS[backend])
    in_scale, in_shift, in_activation = prologue
    c_out, cin_g, kh, kw = weight_shape
    n, c_in = input.shape[:2]
    out_h, out_w = grad.shape[2:]
    if splits is None:
        splits = ext.conv_weight_grad_splits(n, c_in, c_out, kh, kw, out_h, out_w, groups)
    partials = _alloc.empty((splits, c_out, kh, kw, cin_g), input, dtype=torch.float32)
    ext.conv_weight_grad(_dense_nhwc(grad), _dense_nhwc(input), fp32_vector(in_scale), fp32_vector(in_shift),
                         ACTIVATION_CODES[in_activation], list(stride), [padding[0], padding[2]],
                         list(dilation), groups, partials, _allow_tf32(input.dtype))
    total = partials[0] if splits == 1 else partials.sum(0)  # (C_out, KH, KW, C_in/groups)
    # the cast and the layout in one pass; none for an fp32 channels_last weight
    return total.permute(0, 3, 1, 2).to(input.dtype, memory_format=memory_format)


# ---------------------------------------------------------------------------------------------
# the engine table: three primitives per engine, with the fusion hooks
# ---------------------------------------------------------------------------------------------

NO_PROLOGUE, NO_EPILOGUE = (None, None, None), (None, None, None, None)


def prologue_hooks(in_scale, in_shift, in_activation) -> tuple:
    if in_scale is None and in_shift is None and in_activation is None:
        return NO_PROLOGUE  # the identity: the torch engine then skips the reference pass
    return in_scale, in_shift, in_activation


def has_epilogue(out_scale, out_shift, residual, activation) -> bool:
    return not (out_scale is None and out_shift is None and residual is None and activation is None)


def epilogue_hooks(out_scale, out_shift, residual, activation) -> tuple:
    if not has_epilogue(out_scale, out_shift, residual, activation):
        return NO_EPILOGUE
    return out_scale, out_shift, residual, activation


class ConvEngine(NamedTuple):
    """One engine's primitives:
    forward(input, weight, bias, stride, padding, dilation, groups, prologue, epilogue,
            channel_stats) -> (out, mean, var): out = epilogue(conv(prologue(input)) + bias), the
            mean and biased variance of the pre-epilogue y per output channel (fp32; fp64 for
            fp64) or None;
    input_grad(grad, input, weight, stride, padding, dilation, groups) -> d loss / d x_hat in
            input's memory format;
    weight_grad(grad, input, weight, stride, padding, dilation, groups, prologue) -> d loss /
            d weight, reading x_hat = prologue(input).
    padding is (top, bottom, left, right)."""
    forward: Callable
    input_grad: Callable
    weight_grad: Callable


def torch_forward(input, weight, bias, stride, padding, dilation, groups, prologue, epilogue,
                   channel_stats):
    x_hat = input if prologue is NO_PROLOGUE else reference_prologue(input, *prologue)
    y = reference_conv2d(x_hat, weight, bias, stride, padding, dilation, groups)
    mean, var = reference_channel_stats(y) if channel_stats else (None, None)
    if epilogue is not NO_EPILOGUE:
        y = reference_epilogue(y, *epilogue)
    return with_format_of(y, input), mean, var  # torch's conv follows the weight's format too


def _torch_input_grad(grad, input, weight, stride, padding, dilation, groups):
    return reference_conv2d_backward(grad, input, weight, False, stride, padding, dilation, groups,
                                     (True, False))[0]


def _torch_weight_grad(grad, input, weight, stride, padding, dilation, groups, prologue):
    x_hat = input if prologue is NO_PROLOGUE else reference_prologue(input, *prologue)
    return reference_conv2d_backward(grad, x_hat, weight, False, stride, padding, dilation, groups,
                                     (False, True))[1]


def _triton_engine() -> ConvEngine:
    from ..triton import conv as tc

    def forward(input, weight, bias, stride, padding, dilation, groups, prologue, epilogue,
                channel_stats):
        return tc.conv_forward(input, weight, bias, stride, padding, dilation, groups,
                               format_of(input), tc.Prologue(*prologue), tc.Epilogue(*epilogue),
                               channel_stats)

    def input_grad(grad, input, weight, stride, padding, dilation, groups):
        return tc.conv_input_grad(grad, weight, input.shape, stride, padding, dilation, groups,
                                  format_of(input))

    def weight_grad(grad, input, weight, stride, padding, dilation, groups, prologue):
        return tc.conv_weight_grad(grad, input, weight.shape, stride, padding, dilation, groups,
                                   tc.Prologue(*prologue), format_of(weight))
    return ConvEngine(forward, input_grad, weight_grad)


def _csrc_engine(name: str) -> Callable[[], ConvEngine]:
    def load() -> ConvEngine:
        def forward(*args):
            return csrc_conv_forward(name, *args)

        def input_grad(grad, input, weight, stride, padding, dilation, groups):
            return csrc_conv_input_grad(name, grad, weight, input.shape, stride, padding, dilation,
                                        groups, format_of(input))

        def weight_grad(grad, input, weight, stride, padding, dilation, groups, prologue):
            return csrc_conv_weight_grad(name, grad, input, weight.shape, stride, padding, dilation,
                                         groups, prologue, memory_format=format_of(weight))
        return ConvEngine(forward, input_grad, weight_grad)
    return load


_LOADERS: Dict[str, Callable[[], ConvEngine]] = {
    "torch": lambda: ConvEngine(torch_forward, _torch_input_grad, _torch_weight_grad),
    "triton": _triton_engine,
    "cuda": _csrc_engine("cuda"),
    "simt": _csrc_engine("simt"),
}
IMPLEMENTED = tuple(_LOADERS)
_loaded: Dict[str, ConvEngine] = {}


def engine(name: str) -> ConvEngine:
    if name not in _loaded:
        _loaded[name] = _LOADERS[name]()
    return _loaded[name]


def conv_forward(backend: str, input, weight, bias, stride, padding, dilation, groups,
                 prologue=NO_PROLOGUE, epilogue=NO_EPILOGUE, channel_stats=False):
    """ConvEngine.forward on `backend`."""
    return engine(backend).forward(input, weight, bias, stride, padding, dilation, groups,
                                   prologue, epilogue, channel_stats)


def conv_grads(engines: Tuple[Optional[str], Optional[str]], grad, input, weight, stride, padding,
               dilation, groups, prologue=NO_PROLOGUE):
    """(d/d x_hat, d/d weight) of conv(x_hat, weight), x_hat = prologue(input): the input
    gradient on engines[0], the weight gradient on engines[1] (None: not needed). On cuDNN both
    come from one call."""
    input_engine, weight_engine = engines
    if input_engine == weight_engine == "torch":
        x_hat = input if prologue is NO_PROLOGUE else reference_prologue(input, *prologue)
        grad_x_hat, grad_weight, _ = reference_conv2d_backward(grad, x_hat, weight, False, stride,
                                                               padding, dilation, groups)
        return grad_x_hat, grad_weight
    geometry = (stride, padding, dilation, groups)
    grad_x_hat = grad_weight = None
    if input_engine not in (None, "torch") or weight_engine not in (None, "torch"):
        # the kernels read grad channels_last: an NCHW caller's grad is copied once for both passes
        grad = grad.contiguous(memory_format=torch.channels_last)
    if input_engine is not None:
        grad_x_hat = engine(input_engine).input_grad(grad, input, weight, *geometry)
    if weight_engine is not None:
        grad_weight = engine(weight_engine).weight_grad(grad, input, weight, *geometry, prologue)
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
        _usable_engines[key] = tuple(e for e in _AUTO_ENGINES if
                                     _backend.unavailable_reason(e, device, dtype) is None)
    return _usable_engines[key]


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


def _precision(dtype: torch.dtype) -> str:
    """The dtype, and for fp32 whether convs may round through TF32 (cuDNN's switch, which every
    engine follows): a decision measured under one setting does not hold for the other."""
    if dtype == torch.float32:
        return "float32/tf32" if torch.backends.cudnn.allow_tf32 else "float32/ieee"
    return str(dtype)[6:]


def _measured_engine(conv_pass: str, trial, input: Tensor, weight: Tensor, stride, padding, dilation,
                     groups: int, options: tuple = ()) -> str:
    """The engine measured fastest (among those agreeing with cuDNN) for this pass on this kind of
    call: the GPU, dtype, layout, weight shape, groups and geometry exactly, the output pixel
    count to the next power of two (batch and map size share a decision), fusion `options`."""
    out_h, out_w = output_hw(input.shape[2:], weight, stride, padding, dilation)
    pixels = 1 << max(input.shape[0] * out_h * out_w - 1, 0).bit_length()
    key = (conv_pass, _backend.device_name(input.device), _precision(input.dtype),
           "channels_last" if format_of(input) == torch.channels_last else "nchw",
           tuple(weight.shape), groups, tuple(stride), tuple(padding), tuple(dilation),
           pixels, *options)
    if torch.compiler.is_compiling() or type(input) not in (Tensor, torch.nn.Parameter):
        return _known_engine(key, input.device, input.dtype)  # tracing: what is known, nothing run
    return dispatch.DISPATCHER.choose(key + (_versions(),), _usable(input.device, input.dtype),
                                      trial, dispatch.agree)


@torch.compiler.assume_constant_result
def _known_engine(key: tuple, device: torch.device, dtype: torch.dtype) -> str:
    return dispatch.DISPATCHER.known(key + (_versions(),), _usable(device, dtype))


def auto_forward_engine(input, weight, bias, stride, padding, dilation, groups) -> str:
    return _measured_engine("forward", lambda name: conv_forward(
        name, input, weight, bias, stride, padding, dilation, groups)[0],
        input, weight, stride, padding, dilation, groups)


def _hooks_given(hooks: tuple) -> str:
    """Which fusion hooks are given (in a measured decision's key)."""
    return "".join("-" if v is None else "x" for v in hooks)


def auto_fused_forward_engine(input, weight, bias, stride, padding, dilation, groups, prologue,
                              epilogue, channel_stats) -> str:
    options = (_hooks_given(prologue), _hooks_given(epilogue), f"stats={channel_stats}")
    return _measured_engine("fused_forward", lambda name: conv_forward(
        name, input, weight, bias, stride, padding, dilation, groups, prologue, epilogue,
        channel_stats), input, weight, stride, padding, dilation, groups, options)


def auto_grad_engines(grad, input, weight, stride, padding, dilation, groups, prologue,
                      need_input, need_weight) -> Tuple[Optional[str], Optional[str]]:
    """(input-gradient engine, weight-gradient engine) for backend "auto", each measured."""
    geometry = (stride, padding, dilation, groups)
    input_engine = weight_engine = None
    if need_input:
        input_engine = _measured_engine("input_grad", lambda name: conv_grads(
            (name, None), grad, input, weight, *geometry)[0], input, weight, *geometry)
    if need_weight:
        weight_engine = _measured_engine("weight_grad", lambda name: conv_grads(
            (None, name), grad, input, weight, *geometry, prologue)[1],
            input, weight, *geometry, (_hooks_given(prologue),))
    return input_engine, weight_engine


# True: the Triton glue wherever Triton can run, the interpreter on the CPU included (tests set it).
FORCE_TRITON_GLUE = False


def use_triton_glue(input: Tensor) -> bool:
    if input.device.type != "cuda" and not FORCE_TRITON_GLUE:
        return False
    return _backend.unavailable_reason("triton", input.device, input.dtype) is None
