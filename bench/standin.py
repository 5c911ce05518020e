"""A minimal stand-in for the model zoo, used only while packed_kernels.models is missing.

Not a ResNet: a short plain conv stack with the same *structure* per model kind (dense stem,
block-diagonal grouped convs with groups = M*gamma, BN + ReLU, grouped head, estimator-major
logits), so the speed-table machinery can run end to end. Built from stock torch modules; the
packed_kernels rows are the same model after packed_kernels.nn.convert(). Every table row built on it says
"stand-in" in its output and record.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STAGES = ((64, 1), (128, 2), (256, 2))  # (width, stride) of the stand-in's conv stages


class _ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class StandInNet(nn.Module):
    """alpha-wide plain conv net with M*gamma groups; (B, in_ch*in_mult) -> (M*B, classes)."""

    def __init__(self, in_channels: int, num_classes: int, num_estimators: int = 1,
                 alpha: int = 1, gamma: int = 1, input_repeats: int = 1):
        super().__init__()
        self.num_estimators, self.num_classes = num_estimators, num_classes
        self.input_repeats = input_repeats
        layers, c_in = [], in_channels * input_repeats
        for i, (width, stride) in enumerate(STAGES):
            groups = 1 if i == 0 else num_estimators * gamma  # dense stem, as in Packed-Ensembles
            layers.append(_ConvBNReLU(c_in, width * alpha, stride, groups))
            c_in = width * alpha
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, num_estimators * num_classes, 1, groups=num_estimators)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_repeats > 1:  # MIMO: M images side by side on the channel axis
            x = x.repeat(1, self.input_repeats, 1, 1)
        y = self.head(F.adaptive_avg_pool2d(self.features(x), 1)).flatten(1)  # (B, M*C)
        b = y.shape[0]
        return y.reshape(b, self.num_estimators, self.num_classes).transpose(0, 1).reshape(-1, self.num_classes)


class StandInDeepEnsemble(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, num_estimators: int, ):
        super().__init__()
        self.members = nn.ModuleList(StandInNet(in_channels, num_classes)
                                     for _ in range(num_estimators))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([m(x) for m in self.members])


class StandInBatchEnsemble(nn.Module):
    """Shared weights, per-estimator rank-1 input/output scales; the batch is repeated M times."""

    def __init__(self, in_channels: int, num_classes: int, num_estimators: int, ):
        super().__init__()
        self.num_estimators = num_estimators
        self.net = StandInNet(in_channels, num_classes)
        self.r = nn.Parameter(torch.ones(num_estimators, in_channels, 1, 1))
        self.s = nn.Parameter(torch.ones(num_estimators, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        m, b = self.num_estimators, x.shape[0]
        x = (x.unsqueeze(0) * self.r.unsqueeze(1)).reshape(m * b, *x.shape[1:])
        return (self.net(x).reshape(m, b, -1) * self.s.unsqueeze(1)).reshape(m * b, -1)


def build(kind: str, in_channels: int, num_classes: int, num_estimators: int,
          alpha: int, gamma: int) -> nn.Module:
    if kind == "single":
        return StandInNet(in_channels, num_classes)
    if kind == "packed":
        return StandInNet(in_channels, num_classes, num_estimators, alpha, gamma)
    if kind == "deep_ensembles":
        return StandInDeepEnsemble(in_channels, num_classes, num_estimators)
    if kind == "mimo":
        return StandInNet(in_channels, num_classes, num_estimators,
                          input_repeats=num_estimators)
    if kind == "batch_ensemble":
        return StandInBatchEnsemble(in_channels, num_classes, num_estimators)
    raise ValueError(f"unknown model kind {kind!r}")
