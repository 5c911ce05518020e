# SPDX-License-Identifier: Apache-2.0
"""The packing rules every Packed-Ensembles layer shares (torch-uncertainty 0.13's): argument
checks, channel and group geometry, the estimator-major output rearrange, autocast of the
operands handed to our ops, and the "stock" backend name.

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
from einops import rearrange
from torch import Tensor

# Layers set to this backend run torch's own nn.Conv2d/F.conv2d path (no packed_kernels op),
# i.e. exactly what torch-uncertainty runs: the "stock" rows of the speed table.
STOCK = "stock"


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
    """Channels-grouped outputs to the estimator-major batch."""
    return rearrange(out, "b (m c) ... -> (m b) c ...", m=num_estimators)


def autocast_operands(*tensors: Optional[Tensor]):
    """Under autocast, run the custom op at the autocast dtype (as nn.Conv2d would): the op is
    not on autocast's lists, so without this it would see mixed dtypes."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)
