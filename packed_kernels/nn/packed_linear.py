# SPDX-License-Identifier: Apache-2.0
"""Packed-Ensembles Linear, drop-in for torch-uncertainty 0.13's PackedLinear (every
implementation): same arguments, state_dict and outputs."""

from __future__ import annotations

import math
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from .._docs import with_layer_arguments
from .packing import check_packed_parameters


@with_layer_arguments
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
        rows = rearrange(x, "... (g i) -> g (...) i", g=groups)
        bias = None if self.bias is None else self.bias.view(groups, 1, og)
        if bias is None:
            out = torch.bmm(rows, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(bias, rows, self.weight.transpose(1, 2))
        out = out.view(groups, *lead, og)
        if not self.last:
            return rearrange(out, "g ... o -> ... (g o)")
        m = self.num_estimators
        if groups % m == 0:  # a view when gamma == 1
            per = rearrange(out, "(m gamma) ... o -> m ... (gamma o)", m=m)
        else:  # first and last: one dense group holding all estimators' features
            per = rearrange(out[0], "... (m h) -> m ... h", m=m)
        return rearrange(per, "m b ... h -> (m b) ... h") if lead else per

    def _sparse_forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, rows.t()).t()  # (N, out): block-diagonal W x
        if self.bias is not None:
            out = out + self.bias
        out = out.reshape(*lead, out.shape[-1])
        if not self.last:
            return out
        m = self.num_estimators
        if not lead:
            return rearrange(out, "(m h) -> m h", m=m)
        return rearrange(out, "b ... (m h) -> (m b) ... h", m=m)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}, num_estimators={self.num_estimators}, "
                f"first={self.first}, last={self.last}, bias={self.bias is not None}, "
                f"implementation={self.implementation!r}")
