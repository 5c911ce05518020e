"""Packed-Ensembles layers, drop-in for torch-uncertainty 0.13's PackedConv1d/2d/3d,
PackedConvTranspose2d and PackedLinear.

Same constructor arguments and defaults, same channel and group rules, same state_dict keys
and shapes (a torch-uncertainty checkpoint of the layer loads with strict=True), same outputs.
The 1-D and 2-D convolutions run through packed_kernels.grouped_conv2d, so they use the fastest
backend that has landed for the call; PackedConv3d and PackedConvTranspose2d run torch's own.

Channel and group rules (PE-(alpha, M, gamma)):
  in  = int(in_channels * alpha)   (in_channels when `first`: the input is shared)
  out = int(out_channels * alpha)  (out_channels * M when `last`: one head per estimator)
  groups = gamma * groups * M      (1 when `first`); while `in` does not split into groups
  of at least `minimum_channels_per_group` channels, gamma falls back by one (never below 1).
A `last` layer returns estimator-major outputs: "b (m c) ... -> (m b) c ...".
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend
from ..ops.conv import grouped_conv2d

_MODES = ("zeros", "reflect", "replicate", "circular")
# Layers set to this backend run torch's own nn.Conv2d/F.conv2d path (no packed_kernels op),
# i.e. exactly what torch-uncertainty runs: the "stock" rows of the speed table.
STOCK = "stock"


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Choose the engine of every packed_kernels layer in `model`: None/"auto" (the op picks),
    one of packed_kernels.BACKENDS, or "stock" (torch's own convolution, bypassing our ops;
    packed_kernels.nn.BatchNorm2d then runs its torch reference, F.batch_norm + add + ReLU).
    Returns `model`."""
    allowed = (None, "auto", STOCK) + tuple(_backend.BACKENDS)
    if backend not in allowed:
        raise ValueError(f"set_backend: backend must be one of {allowed}, got {backend!r}")
    try:  # lands separately; until then there is no packed batch norm to route
        from .batch_norm import BatchNorm2d as packed_batch_norm
    except ImportError:
        packed_batch_norm = None
    for module in model.modules():
        if getattr(type(module), "routes_through_packed_ops", False):
            module.backend = backend
        elif packed_batch_norm is not None and isinstance(module, packed_batch_norm):
            module.backend = "torch" if backend == STOCK else backend
    return model


def check_packed_parameters(layer: str, alpha, gamma, num_estimators) -> None:
    """torch-uncertainty's validation of (alpha, gamma, num_estimators), same exception types."""
    if alpha is None:
        raise ValueError(f"{layer}: you must specify `alpha`")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{layer}: `alpha` must be a number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{layer}: `alpha` must be a finite number > 0, got {alpha}")
    if isinstance(gamma, bool) or not isinstance(gamma, int):
        raise TypeError(f"{layer}: `gamma` must be an int, got {type(gamma).__name__}")
    if gamma <= 0:
        raise ValueError(f"{layer}: `gamma` must be >= 1, got {gamma}")
    if num_estimators is None:
        raise ValueError(f"{layer}: you must specify `num_estimators`")
    if isinstance(num_estimators, bool) or not isinstance(num_estimators, int):
        raise TypeError(f"{layer}: `num_estimators` must be an int, got {type(num_estimators).__name__}")
    if num_estimators <= 0:
        raise ValueError(f"{layer}: `num_estimators` must be >= 1, got {num_estimators}")


def packed_conv_geometry(layer: str, in_channels: int, out_channels: int, alpha: float,
                         num_estimators: int, gamma: int, groups: int,
                         minimum_channels_per_group: int, first: bool,
                         last: bool) -> Tuple[int, int, int]:
    """(extended in channels, extended out channels, groups of the underlying conv)."""
    check_packed_parameters(layer, alpha, gamma, num_estimators)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{layer}: `groups` must be an int >= 1, got {groups!r}")
    ext_in = int(in_channels * (1 if first else alpha))
    ext_out = int(out_channels * (num_estimators if last else alpha))
    per_estimator = groups * num_estimators
    conv_groups = 1 if first else gamma * per_estimator
    # gamma fallback: thinner groups than the minimum (or a split that does not divide) cost
    # speed and capacity, so drop gamma until the split works or gamma reaches 1.
    while ((ext_in % conv_groups or ext_in // conv_groups < minimum_channels_per_group)
           and conv_groups // per_estimator > 1):
        gamma -= 1
        conv_groups = gamma * per_estimator
    if ext_in < 1 or ext_out < 1:
        raise ValueError(f"{layer}: in_channels={in_channels}, out_channels={out_channels} with "
                         f"alpha={alpha} give an empty layer ({ext_in} -> {ext_out} channels)")
    if ext_in % conv_groups:
        raise ValueError(f"{layer}: `in_channels` ({in_channels}, {ext_in} after alpha) is not "
                         f"divisible by the {conv_groups} groups; make it divisible by "
                         f"gamma * groups * num_estimators ({gamma * per_estimator})")
    if ext_out % (gamma * per_estimator):
        raise ValueError(f"{layer}: `out_channels` ({out_channels}, {ext_out} after "
                         f"{'num_estimators' if last else 'alpha'}) is not divisible by "
                         f"gamma * groups * num_estimators ({gamma * per_estimator})")
    return ext_in, ext_out, conv_groups


def estimator_major(out: Tensor, num_estimators: int) -> Tensor:
    """Channels-grouped outputs to the estimator-major batch: "b (m c) ... -> (m b) c ..."."""
    b, channels = out.shape[0], out.shape[1]
    per_estimator = channels // num_estimators
    split = out.reshape(b, num_estimators, per_estimator, *out.shape[2:])
    return split.transpose(0, 1).reshape(num_estimators * b, per_estimator, *out.shape[2:])


def autocast_operands(*tensors: Optional[Tensor]):
    """Under autocast, run the custom op at the autocast dtype (as nn.Conv2d would): the op is
    not on autocast's lists, so without this it would see mixed dtypes."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def _wrapping(cls, conv_cls, conv: nn.Module, num_estimators: int, first: bool, last: bool):
    """A bare `cls` module for from_conv() to wrap `conv` in (an exact `conv_cls`), with its
    estimator settings checked and set."""
    if type(conv) is not conv_cls:
        raise TypeError(f"{cls.__name__}.from_conv needs an nn.{conv_cls.__name__}, "
                        f"got {type(conv).__name__}")
    if (isinstance(num_estimators, bool) or not isinstance(num_estimators, int)
            or num_estimators < 1 or (last and conv.out_channels % num_estimators)):
        raise ValueError(f"{cls.__name__}.from_conv: num_estimators={num_estimators!r} does "
                         f"not fit a conv with {conv.out_channels} output channels")
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.first, layer.last, layer.num_estimators = first, last, num_estimators
    return layer


class _PackedConvNd(nn.Module):
    """Shared body of PackedConv1d/2d: the geometry, an inner nn.ConvNd named `conv` (so the
    state_dict keys are torch-uncertainty's conv.weight / conv.bias) and the `last` rearrange."""

    _conv_cls = nn.Conv2d
    _spatial_dims = 2
    routes_through_packed_ops = True  # set_backend() applies
    backend: Optional[str] = None  # class default: also right for pickles made before it existed

    def __init__(self, in_channels: int, out_channels: int, kernel_size, alpha: float,
                 num_estimators: int, gamma: int = 1, stride=1, padding=0, dilation=1,
                 groups: int = 1, minimum_channels_per_group: int = 64, bias: bool = True,
                 padding_mode: str = "zeros", first: bool = False, last: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        layer = type(self).__name__
        if padding_mode not in _MODES:
            raise ValueError(f"{layer}: padding_mode must be one of {_MODES}, got {padding_mode!r}")
        ext_in, ext_out, conv_groups = packed_conv_geometry(
            layer, in_channels, out_channels, alpha, num_estimators, gamma, groups,
            minimum_channels_per_group, first, last)
        self.first = first
        self.last = last
        self.num_estimators = num_estimators
        self.conv = self._conv_cls(ext_in, ext_out, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=conv_groups, bias=bias,
                                   padding_mode=padding_mode, device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Module, num_estimators: int, first: bool = False,
                  last: bool = False):
        """Wrap an existing inner convolution (weights shared, not copied): used by convert()."""
        layer = _wrapping(cls, cls._conv_cls, conv, num_estimators, first, last)
        layer.conv = conv
        return layer

    @property
    def weight(self) -> Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.conv.bias

    def _padded(self, x: Tensor) -> Tensor:
        if self.conv.padding_mode == "zeros":
            return x
        return F.pad(x, self.conv._reversed_padding_repeated_twice, mode=self.conv.padding_mode)

    def _padding(self):
        return 0 if self.conv.padding_mode != "zeros" else self.conv.padding

    def forward(self, x: Tensor) -> Tensor:
        batched = 2 + self._spatial_dims  # (N, C, *spatial)
        if not isinstance(x, Tensor) or x.dim() not in (batched - 1, batched):
            raise ValueError(f"{type(self).__name__}: input must have {batched} dimensions (batched) "
                             f"or {batched - 1} (unbatched), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        unbatched = x.dim() == batched - 1  # as torch's convs: a batch of one, without its dim
        out = self._conv_forward(x.unsqueeze(0) if unbatched else x)
        if self.last:  # estimator-major rows: M of them for one sample
            return estimator_major(out, self.num_estimators)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"num_estimators={self.num_estimators}, first={self.first}, last={self.last}"


class PackedConv2d(_PackedConvNd):
    """Packed-Ensembles Conv2d: torch-uncertainty's arguments, defaults and state_dict."""

    _conv_cls = nn.Conv2d

    def _conv_forward(self, x: Tensor) -> Tensor:
        if self.backend == STOCK:
            return self.conv(x)
        x, weight, bias = autocast_operands(self._padded(x), self.conv.weight, self.conv.bias)
        return grouped_conv2d(x, weight, bias, self.conv.stride, self._padding(),
                              self.conv.dilation, self.conv.groups, backend=self.backend)


class PackedConv1d(_PackedConvNd):
    """Packed-Ensembles Conv1d, run as a 2-D grouped convolution of height 1."""

    _conv_cls = nn.Conv1d
    _spatial_dims = 1

    def _conv_forward(self, x: Tensor) -> Tensor:
        if self.backend == STOCK:
            return self.conv(x)
        x, weight, bias = autocast_operands(self._padded(x), self.conv.weight, self.conv.bias)
        padding = self._padding()
        if not isinstance(padding, str):
            padding = (0, padding if isinstance(padding, int) else padding[0])
        out = grouped_conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, self.conv.stride[0]),
                             padding, (1, self.conv.dilation[0]), self.conv.groups,
                             backend=self.backend).squeeze(2)
        return out


class PackedConv3d(_PackedConvNd):
    """Packed-Ensembles Conv3d: torch-uncertainty's arguments, defaults and state_dict, on
    torch's own nn.Conv3d (the library's kernels are 2-D)."""

    _conv_cls = nn.Conv3d
    _spatial_dims = 3
    routes_through_packed_ops = False  # set_backend() has nothing to route

    def _conv_forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class PackedConvTranspose2d(nn.Module):
    """Packed-Ensembles ConvTranspose2d: torch-uncertainty's arguments, defaults and state_dict
    (the inner nn.ConvTranspose2d is `conv_transpose`), on torch's own transposed convolution.
    Same channel and group rules as PackedConv2d; a `last` layer returns estimator-major rows."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, alpha: float,
                 num_estimators: int, gamma: int = 1, stride=1, padding=0, output_padding=0,
                 dilation=1, groups: int = 1, minimum_channels_per_group: int = 64,
                 bias: bool = True, first: bool = False, last: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        ext_in, ext_out, conv_groups = packed_conv_geometry(
            "PackedConvTranspose2d", in_channels, out_channels, alpha, num_estimators, gamma,
            groups, minimum_channels_per_group, first, last)
        self.num_estimators, self.first, self.last = num_estimators, first, last
        # torch-uncertainty's attribute names
        self.extended_in_channels, self.extended_out_channels = ext_in, ext_out
        self.actual_groups = conv_groups
        self.conv_transpose = nn.ConvTranspose2d(
            ext_in, ext_out, kernel_size, stride=stride, padding=padding,
            output_padding=output_padding, dilation=dilation, groups=conv_groups, bias=bias,
            device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.ConvTranspose2d, num_estimators: int, first: bool = False,
                  last: bool = False) -> "PackedConvTranspose2d":
        """Wrap an existing nn.ConvTranspose2d (weights shared, not copied): used by convert()."""
        layer = _wrapping(cls, nn.ConvTranspose2d, conv, num_estimators, first, last)
        layer.extended_in_channels, layer.extended_out_channels = conv.in_channels, conv.out_channels
        layer.actual_groups = conv.groups
        layer.conv_transpose = conv
        return layer

    @property
    def weight(self) -> Tensor:
        return self.conv_transpose.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.conv_transpose.bias

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        out = self.conv_transpose(x, output_size)
        if not self.last:
            return out
        if out.dim() == 3:  # unbatched: one sample, M rows
            return estimator_major(out.unsqueeze(0), self.num_estimators)
        return estimator_major(out, self.num_estimators)

    def extra_repr(self) -> str:
        return f"num_estimators={self.num_estimators}, first={self.first}, last={self.last}"


class PackedLinear(nn.Module):
    """Packed-Ensembles Linear with torch-uncertainty's 3-D weight (groups, out/groups, in/groups).

    Input (B, *, in) ; output (B, *, out) or, when `last`, estimator-major (M*B, *, out_features).
    `implementation`, as torch-uncertainty's: "einsum", "full" and "conv1d" compute the same
    function from the same parameters (here one batched matmul); "sparse" stores the weight as
    a sparse (COO) block-diagonal (out, in) matrix, as upstream does, and multiplies by it. An
    unknown value set after construction is refused at the forward."""

    IMPLEMENTATIONS = ("einsum", "full", "conv1d", "sparse")

    def __init__(self, in_features: int, out_features: int, alpha: float, num_estimators: int,
                 gamma: int = 1, bias: bool = True, first: bool = False, last: bool = False,
                 implementation: str = "einsum", device=None, dtype=None) -> None:
        check_packed_parameters("PackedLinear", alpha, gamma, num_estimators)
        self._check_implementation(implementation)
        super().__init__()
        ext_in = int(in_features * (1 if first else alpha))
        ext_out = int(out_features * (num_estimators if last else alpha))
        groups = 1 if first else num_estimators * gamma
        if ext_in < 1 or ext_out < 1:
            raise ValueError(f"PackedLinear: in_features={in_features}, out_features="
                             f"{out_features} with alpha={alpha} give an empty layer")
        if ext_in % groups:
            raise ValueError(f"PackedLinear: `in_features` ({in_features}, {ext_in} after alpha) "
                             f"is not divisible by num_estimators * gamma ({groups})")
        if ext_out % (num_estimators * gamma):
            raise ValueError(f"PackedLinear: `out_features` ({out_features}, {ext_out} after "
                             f"{'num_estimators' if last else 'alpha'}) is not divisible by "
                             f"num_estimators * gamma ({num_estimators * gamma})")
        self.first = first
        self.last = last
        self.num_estimators = num_estimators
        self.implementation = implementation
        self.groups = groups
        self.in_features = ext_in // groups  # per group, as torch-uncertainty reports them
        self.out_features = ext_out // groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(groups, self.out_features, self.in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(ext_out, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @classmethod
    def _check_implementation(cls, implementation) -> None:
        if implementation not in cls.IMPLEMENTATIONS:
            raise ValueError(f"PackedLinear: unknown implementation {implementation!r}; "
                             f"available: {cls.IMPLEMENTATIONS}")

    @property
    def sparse(self) -> bool:
        """Whether the weight is the sparse block-diagonal matrix (implementation="sparse")."""
        return self.weight.layout != torch.strided

    @classmethod
    def from_parameters(cls, weight: nn.Parameter, bias: Optional[nn.Parameter], num_estimators: int,
                        first: bool = False, last: bool = False, implementation: str = "einsum",
                        groups: Optional[int] = None) -> "PackedLinear":
        """Wrap existing parameters (shared, not copied): used by convert() on
        torch-uncertainty's PackedLinear. weight: (groups, out/groups, in/groups), or the sparse
        block-diagonal (out, in) matrix of implementation="sparse" with its `groups`."""
        cls._check_implementation(implementation)
        if weight.layout != torch.strided:
            if weight.dim() != 2 or groups is None or weight.shape[0] % groups or weight.shape[1] % groups:
                raise ValueError("PackedLinear.from_parameters: a sparse weight must be a 2-D "
                                 "block-diagonal matrix whose `groups` divides both sides")
            og, ig = weight.shape[0] // groups, weight.shape[1] // groups
            implementation = "sparse"
        elif weight.dim() != 3:
            raise ValueError(f"PackedLinear.from_parameters: weight must be 3-D, got {tuple(weight.shape)}")
        else:
            groups, og, ig = weight.shape
            if implementation == "sparse":
                raise ValueError("PackedLinear.from_parameters: implementation='sparse' needs the "
                                 "sparse block-diagonal weight")
        if bias is not None and tuple(bias.shape) != (groups * og,):
            raise ValueError(f"PackedLinear.from_parameters: bias must have shape ({groups * og},)")
        if last and (groups * og) % num_estimators:
            raise ValueError("PackedLinear.from_parameters: num_estimators does not divide the outputs")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.first, layer.last, layer.num_estimators = first, last, num_estimators
        layer.implementation = implementation
        layer.groups, layer.in_features, layer.out_features = groups, ig, og
        layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        if bias is None:
            layer.register_parameter("bias", None)
        else:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        return layer

    def reset_parameters(self) -> None:
        # Each group is initialised like an nn.Linear of its own size.
        if self.sparse:  # start again from the dense blocks
            weight = torch.empty(self.groups, self.out_features, self.in_features,
                                 dtype=self.weight.dtype, device=self.weight.device)
        else:
            weight = self.weight
        for g in range(self.groups):
            nn.init.kaiming_uniform_(weight[g], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        if self.implementation == "sparse":
            self.weight = nn.Parameter(torch.block_diag(*weight.detach()).to_sparse())

    def forward(self, x: Tensor) -> Tensor:
        self._check_implementation(self.implementation)
        groups, og, ig = self.groups, self.out_features, self.in_features
        if x.dim() < 1 or x.shape[-1] != groups * ig:
            raise ValueError(f"PackedLinear: expected input (..., {groups * ig}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if self.sparse:
            return self._sparse_forward(x)
        rows = x.reshape(-1, groups, ig).transpose(0, 1)  # (G, N, in/G)
        bias = None if self.bias is None else self.bias.view(groups, 1, og)
        if bias is None:
            out = torch.bmm(rows, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(bias, rows, self.weight.transpose(1, 2))  # (G, N, out/G)
        if not self.last:
            return out.transpose(0, 1).reshape(*lead, groups * og)
        m = self.num_estimators
        if groups % m == 0:  # (m gamma) n o -> m n (gamma o): a view when gamma == 1
            per = out.reshape(m, groups // m, -1, og).transpose(1, 2).reshape(m, -1, groups // m * og)
        else:  # first and last: one dense group holding all estimators' features
            per = out[0].reshape(-1, m, groups * og // m).transpose(0, 1)
        if len(lead) == 0:
            return per.reshape(m, -1)
        return per.reshape(m * lead[0], *lead[1:], per.shape[-1])

    def _sparse_forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, rows.t()).t()  # (N, out): block-diagonal W x
        if self.bias is not None:
            out = out + self.bias
        out = out.reshape(*lead, out.shape[-1])
        if not self.last:
            return out
        # "b ... (m h) -> (m b) ... h"
        m = self.num_estimators
        per = out.reshape(*lead, m, out.shape[-1] // m).movedim(-2, 0)
        return per.reshape(m * lead[0], *lead[1:], per.shape[-1]) if lead else per.reshape(m, -1)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}, num_estimators={self.num_estimators}, "
                f"first={self.first}, last={self.last}, bias={self.bias is not None}, "
                f"implementation={self.implementation!r}")


class GroupedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) whose forward runs packed_kernels.grouped_conv2d;
    convert() puts it in place of grouped nn.Conv2d layers."""

    routes_through_packed_ops = True
    backend: Optional[str] = None  # see set_backend()

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == STOCK:
            return super().forward(x)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        x, weight, bias = autocast_operands(x, self.weight, self.bias)
        return grouped_conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups,
                              backend=self.backend)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "GroupedConv2d":
        """Same hyper-parameters, sharing `conv`'s parameter tensors (nothing is copied)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta", dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new
