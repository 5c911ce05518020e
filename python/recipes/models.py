# SPDX-License-Identifier: Apache-2.0
"""Model choice for the recipes: a name and an ensembling method -> a model of the zoo.

Every model maps inputs (B, ...) to estimator-major logits (M*B, K). The recipes build them
only through build_model(), from a plain-dict spec that checkpoints store, so evaluate.py can
rebuild what train.py trained.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from packed_kernels import models as zoo

from .errors import RecipeError

METHODS = ("single", "packed", "deep", "mimo", "batch", "masksembles")
MASKSEMBLES_SCALE = 2.0  # the Packed-Ensembles paper's Masksembles configuration (with M = 4)


# ---------------------------------------------------------------------------------------------
# small models built from packed_kernels.nn layers (CPU-sized demos)
# ---------------------------------------------------------------------------------------------

class PackedSmallCNN(nn.Module):
    """A small packed CNN for tiny images (scikit-learn's 8x8 digits): three packed 3x3 convs
    (BN, ReLU; one 2x2 max-pool), global average pooling, a packed linear head.

    PE-(alpha, M, gamma): each estimator has alpha*width/M channels per layer. PE-(1, 1, 1) is
    the single model; PE-(M, M, 1) is exactly M independent networks of full width (every
    layer block-diagonal, the first one equal to M separate first layers), i.e. a Deep Ensemble
    whose members see the same mini-batches."""

    def __init__(self, in_channels: int, num_classes: int, num_estimators: int = 1,
                 alpha: float = 1, gamma: int = 1, width: int = 16) -> None:
        super().__init__()
        from packed_kernels.nn import PackedConv2d, PackedLinear
        m = num_estimators
        # minimum_channels_per_group=1: these layers are narrow by design; torch-uncertainty's
        # default of 64 would silently drop gamma to 1.
        common = dict(alpha=alpha, num_estimators=m, minimum_channels_per_group=1, bias=False)
        self.num_estimators = m
        self.conv1 = PackedConv2d(in_channels, width, 3, gamma=1, padding=1, first=True, **common)
        self.bn1 = nn.BatchNorm2d(self.conv1.conv.out_channels)
        self.conv2 = PackedConv2d(width, 2 * width, 3, gamma=gamma, padding=1, **common)
        self.bn2 = nn.BatchNorm2d(self.conv2.conv.out_channels)
        self.conv3 = PackedConv2d(2 * width, 2 * width, 3, gamma=gamma, padding=1, **common)
        self.bn3 = nn.BatchNorm2d(self.conv3.conv.out_channels)
        self.head = PackedLinear(2 * width, num_classes, alpha, m, gamma=1, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))


class PackedGaussianMLP(nn.Module):
    """PackedLinear MLP with a heteroscedastic Gaussian head (the paper's appendix N):
    (B, features) -> mean (M*B,) and variance (M*B,) per estimator (softplus, floored)."""

    def __init__(self, in_features: int, num_estimators: int = 1, alpha: float = 1,
                 gamma: int = 1, hidden: int = 48, depth: int = 2, min_variance: float = 1e-6):
        super().__init__()
        from packed_kernels.nn import PackedLinear
        self.num_estimators = num_estimators
        self.min_variance = min_variance
        layers = []
        width_in, first = in_features, True
        for _ in range(depth):
            layers += [PackedLinear(width_in, hidden, alpha, num_estimators,
                                    gamma=1 if first else gamma, first=first), nn.ReLU()]
            width_in, first = hidden, False
        self.body = nn.Sequential(*layers)
        self.head = PackedLinear(hidden, 2, alpha, num_estimators, gamma=1, last=True)

    def forward(self, x: torch.Tensor):
        out = self.head(self.body(x))
        mean, raw_variance = out[:, 0], out[:, 1]
        return mean, nn.functional.softplus(raw_variance) + self.min_variance


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

def _check_ensemble_args(method: str, num_estimators, alpha, gamma) -> None:
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(num_estimators, bool) or not isinstance(num_estimators, int) or num_estimators < 1:
        raise RecipeError(f"the number of estimators M must be an integer >= 1, got {num_estimators!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise RecipeError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise RecipeError(f"gamma must be an integer >= 1, got {gamma!r}")


def effective_estimators(spec: Dict) -> int:
    return 1 if spec["method"] == "single" else spec["num_estimators"]


def _small_cnn(spec: Dict) -> nn.Module:
    method, m = spec["method"], spec["num_estimators"]
    if method == "single":
        alpha, m, gamma = 1, 1, 1
    elif method == "packed":
        alpha, gamma = spec["alpha"], spec["gamma"]
    elif method == "deep":
        alpha, gamma = m, 1  # M independent full-width networks (see PackedSmallCNN)
    else:
        raise RecipeError(f"model 'small_cnn' supports the methods single, packed and deep, "
                          f"not {method!r}")
    return PackedSmallCNN(spec["in_channels"], spec["num_classes"], m, alpha, gamma,
                          width=spec.get("width") or 16)


RESNET_ARCHS = (18, 20, 34, 44, 50, 56, 101, 110, 152)


def _resnet(arch: int):
    def build(spec: Dict) -> nn.Module:
        method, m = spec["method"], spec["num_estimators"]
        common = dict(in_channels=spec["in_channels"], num_classes=spec["num_classes"], arch=arch,
                      style=spec["style"])
        if method == "single":
            return zoo.resnet(**common)
        if method == "packed":
            return zoo.packed_resnet(**common, num_estimators=m, alpha=spec["alpha"],
                                     gamma=spec["gamma"])
        if method == "deep":
            return zoo.deep_ensemble_resnet(**common, num_estimators=m)
        if method == "mimo":
            return zoo.mimo_resnet(**common, num_estimators=m)
        if method == "masksembles":
            # "legacy": every member trains on the whole batch, as the recipes train the other
            # ensembles (outputs M*B rows, targets repeated M times)
            return zoo.masksembles_resnet(**common, num_estimators=m, scale=MASKSEMBLES_SCALE,
                                          repeat_strategy="legacy")
        return zoo.batched_resnet(**common, num_estimators=m)
    return build


def _wideresnet28x10(spec: Dict) -> nn.Module:
    method, m = spec["method"], spec["num_estimators"]
    if method not in ("single", "packed", "deep"):
        raise RecipeError(f"model 'wideresnet28x10' supports the methods single, packed and deep, "
                          f"not {method!r}")
    alpha, m, gamma = {"single": (1, 1, 1), "packed": (spec["alpha"], m, spec["gamma"]),
                       "deep": (m, m, 1)}[method]  # deep: M full-width block-diagonal members
    return zoo.packed_wideresnet28x10(spec["in_channels"], spec["num_classes"], num_estimators=m,
                                      alpha=alpha, gamma=gamma, style=spec["style"])


_BUILDERS = {"small_cnn": _small_cnn, "wideresnet28x10": _wideresnet28x10,
             **{f"resnet{arch}": _resnet(arch) for arch in RESNET_ARCHS}}


def training_batch(spec: Dict):
    """How a mini-batch becomes the model's training input and targets, or None for the
    default (the images as they are, the targets repeated M times). MIMO trains its M
    subnetworks on M independently shuffled copies of the batch (torch-uncertainty's MIMO
    with no batch repetition)."""
    if spec["method"] != "mimo":
        return None
    m = spec["num_estimators"]

    def mimo(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        perms = [torch.arange(labels.shape[0])] + [torch.randperm(labels.shape[0], generator=gen)
                                                   for _ in range(m - 1)]
        index = torch.cat(perms).to(labels.device)
        return images[index], labels[index]
    return mimo


def model_names():
    return sorted(_BUILDERS)


def make_spec(model: str, method: str, *, in_channels: int, num_classes: int,
              num_estimators: int = 4, alpha: float = 2, gamma: int = 1,
              style: str = "cifar", width: Optional[int] = None) -> Dict:
    if model not in _BUILDERS:
        raise RecipeError(f"unknown model {model!r}; available: {', '.join(model_names())}")
    _check_ensemble_args(method, num_estimators, alpha, gamma)
    if isinstance(alpha, float) and alpha.is_integer():
        alpha = int(alpha)
    return {"model": model, "method": method, "num_estimators": num_estimators, "alpha": alpha,
            "gamma": gamma, "in_channels": in_channels, "num_classes": num_classes,
            "style": style, "width": width}


def build_model(spec: Dict) -> nn.Module:
    """The model a spec describes; configuration errors of the zoo become RecipeError."""
    builder = _BUILDERS.get(spec["model"])
    if builder is None:
        raise RecipeError(f"unknown model {spec['model']!r}; available: {', '.join(model_names())}")
    _check_ensemble_args(spec["method"], spec["num_estimators"], spec["alpha"], spec["gamma"])
    try:
        return builder(spec)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"invalid configuration for {spec['model']} ({spec['method']}, "
                          f"alpha={spec['alpha']}, M={spec['num_estimators']}, "
                          f"gamma={spec['gamma']}): {exc}") from None
