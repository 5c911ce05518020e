# SPDX-License-Identifier: Apache-2.0
"""The model zoo: Packed-Ensembles ResNets / Wide-ResNet (torch-uncertainty compatible) and
the baselines of the speed table (Single, Deep Ensembles, MIMO, BatchEnsemble, Masksembles).
Every model returns estimator-major logits (M*B, classes)."""

from .baselines import (BatchConv2d, BatchedResNet, BatchLinear, MIMOResNet, batched_resnet,
                        deep_ensemble_resnet, mimo_resnet, resnet)
from .masksembles import MasksemblesResNet, masksembles_resnet
from .resnet import PackedResNet, packed_resnet
from .wideresnet import PackedWideResNet, packed_wideresnet28x10

__all__ = [
    "BatchConv2d", "BatchLinear", "BatchedResNet", "MIMOResNet", "MasksemblesResNet", "PackedResNet",
    "PackedWideResNet",
    "batched_resnet", "deep_ensemble_resnet", "masksembles_resnet", "mimo_resnet", "packed_resnet",
    "packed_wideresnet28x10", "resnet",
]
