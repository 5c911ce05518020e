# SPDX-License-Identifier: Apache-2.0
"""The public models' and Packed-Ensembles layers' arguments, each described once:
`with_arguments` (models) and `with_layer_arguments` (layers) append the description of every
parameter a class or factory takes to its docstring (what help() shows), and refuse, at
import, a parameter nobody described."""

from __future__ import annotations

import inspect
import textwrap
from typing import Callable, TypeVar

T = TypeVar("T")

MODEL_ARGUMENTS = {
    "in_channels": "channels of the input images: input (B, in_channels, H, W), float32 / float16 "
                   "/ bfloat16 (or any float dtype on torch's ops), NCHW or channels_last.",
    "num_classes": "classes of the output logits.",
    "arch": "ResNet depth: 18 and 34 (basic blocks), 50, 101 and 152 (bottlenecks), 64 base "
            "planes, 4 stages; 20, 44, 56 and 110: the CIFAR family (basic blocks, 16 base "
            "planes, 3 stages).",
    "num_estimators": "M, the ensemble's members (>= 1). Outputs are estimator-major "
                      "(M*B, num_classes): rows m*B .. m*B + B - 1 are member m's.",
    "alpha": "Packed-Ensembles' width factor: every layer is int(channels * alpha) wide across "
             "the M members.",
    "gamma": "Packed-Ensembles' groups per member in each convolution (>= 1; the ResNets' "
             "stem convolution is not split).",
    "conv_bias": "whether the convolutions have a bias.",
    "width_multiplier": "scales the base planes (64, or 16 for the CIFAR family).",
    "groups": "groups of every convolution within each member (torch-uncertainty's `groups`; "
              "1: dense within a member).",
    "dropout_rate": "dropout probability, in each block between its convolutions and before "
                    "the classifier.",
    "style": '"imagenet" (7x7 stride-2 stem and a 3x3 max-pool) or "cifar" (3x3 stride-1 stem, '
             "no pool); torch-uncertainty's style enum is accepted too.",
    "normalization_layer": "the norm class, called as norm(num_features); None: "
                           "packed_kernels.nn.BatchNorm2d (a drop-in nn.BatchNorm2d with which "
                           "conv + BN + ReLU blocks run fused on the kernel backends; "
                           "packed_kernels.nn.set_backend chooses the backend).",
    "linear_implementation": 'the PackedLinear head\'s implementation: "conv1d", "einsum", '
                             '"full" (same function) or "sparse" (torch-uncertainty\'s).',
    "block": "the residual block class (BasicBlock or Bottleneck of packed_kernels.models.resnet).",
    "num_blocks": "blocks per stage (3 or 4 stages).",
    "in_planes": "planes of the first stage, before alpha (64; 16 for the CIFAR family).",
    "depth": "Wide-ResNet depth, 6n + 4 (n blocks per stage; 28: n = 4).",
    "widen_factor": "the Wide-ResNet's k: stages of 16k, 32k and 64k planes.",
    "activation_fn": "the activation, a function of a tensor (F.relu by default; the fused "
                     "conv + BN path applies to ReLU only).",
    "scale": "Masksembles' scale (> 1): how far the members' masks overlap; each mask keeps "
             "about 1/scale of a layer's channels.",
    "repeat_strategy": '"paper" or "legacy": in training, "legacy" repeats the input M times, '
                       '"paper" gives its M consecutive blocks of B/M rows to the M members '
                       "(eval always repeats).",
    "seed": "seeds the masks' draw, for reproducible masks (None: fresh masks, as upstream).",
}

# torch-uncertainty 0.13's Packed-Ensembles layer arguments (packing.py states the rules).
LAYER_ARGUMENTS = {
    "in_channels": "input channels before alpha: the input has int(in_channels * alpha) "
                   "channels (in_channels when `first`).",
    "out_channels": "output channels before alpha: the output has int(out_channels * alpha) "
                    "channels (out_channels * num_estimators when `last`).",
    "in_features": "input features before alpha (as in_channels).",
    "out_features": "output features before alpha (as out_channels).",
    "kernel_size": "as torch's convolution's (an int or a tuple).",
    "stride": "as torch's convolution's.",
    "padding": "as torch's convolution's (an int, a tuple, or \"same\" / \"valid\").",
    "output_padding": "as nn.ConvTranspose2d's.",
    "dilation": "as torch's convolution's.",
    "alpha": "Packed-Ensembles' width factor (> 0).",
    "num_estimators": "M, the estimators (>= 1).",
    "gamma": "groups per estimator (>= 1); falls back by one (never below 1) while a group "
             "would get fewer than minimum_channels_per_group input channels.",
    "groups": "groups within each estimator (torch-uncertainty's `groups`): the layer has "
              "gamma * groups * num_estimators groups (1 when `first`).",
    "minimum_channels_per_group": "the fewest input channels a group may have before gamma "
                                  "falls back.",
    "bias": "a learnable bias per output channel.",
    "padding_mode": '"zeros", "reflect", "replicate" or "circular", as torch\'s.',
    "first": "the network's first layer: the input is shared by all estimators (no alpha on "
             "it, one group).",
    "last": "the network's last layer: out_channels * num_estimators outputs, returned "
            "estimator-major: (B, M*C, ...) -> (M*B, C, ...).",
    "implementation": '"einsum", "full", "conv1d" (the same batched matmul) or "sparse" (a '
                      "sparse block-diagonal weight, as torch-uncertainty's).",
    "device": "of the parameters.",
    "dtype": "of the parameters.",
}

_SKIPPED = {"self", "args", "kwargs"}


def _appending(table: dict, name: str) -> Callable[[T], T]:
    def decorate(obj: T) -> T:
        """Appends an "Args:" section for obj's parameters (a class: its __init__'s)."""
        target = obj.__init__ if isinstance(obj, type) else obj
        names = [n for n in inspect.signature(target).parameters if n not in _SKIPPED]
        missing = [n for n in names if n not in table]
        if missing:
            raise TypeError(f"{obj.__qualname__}: no description of {missing} in _docs.{name}")
        lines = ["", "", "Args:"]
        for arg in names:
            lines += textwrap.wrap(f"{arg}: {table[arg]}", 92, initial_indent="    ",
                                   subsequent_indent="        ")
        obj.__doc__ = inspect.cleandoc(obj.__doc__ or "") + "\n".join(lines)
        return obj
    return decorate


with_arguments = _appending(MODEL_ARGUMENTS, "MODEL_ARGUMENTS")
with_layer_arguments = _appending(LAYER_ARGUMENTS, "LAYER_ARGUMENTS")
