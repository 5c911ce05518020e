"""Batch-norm shapes of PE-(2,4,1) CIFAR ResNet-50 (32x32 input, 3x3 stem without max-pool,
bottleneck layers [3, 4, 6, 3] with the stride on the 3x3 conv, alpha = 2 doubling every width),
for the batch-norm benchmarks. Per (channels, height, width): how many BN layers have it.

Bytes per training step of one BN layer (forward + backward, batch N, itemsize b):
forward reads x twice (statistics, normalise) and writes y; backward reads dy, x and y (the ReLU
mask) twice and writes dx: 10 N C H W b in all (+ residual traffic when fused), the count
`training_bytes` returns. torch's unfused BN + ReLU moves more (the ReLU re-reads and re-writes).
"""

from __future__ import annotations

from typing import List, NamedTuple

ALPHA = 2
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (planes, blocks, stride)
EXPANSION = 4


class BNCase(NamedTuple):
    channels: int
    height: int
    width: int
    count: int  # layers of this shape in the model

    @property
    def name(self) -> str:
        return f"C{self.channels}_{self.height}x{self.width}"


def pe_resnet50_bn_cases(alpha: int = ALPHA, image_size: int = 32) -> List[BNCase]:
    counts = {}

    def add(channels, size):
        key = (channels, size)
        counts[key] = counts.get(key, 0) + 1

    size = image_size
    add(64 * alpha, size)  # stem
    in_channels = 64 * alpha
    for planes, blocks, stride in STAGES:
        width, out = planes * alpha, planes * EXPANSION * alpha
        for block in range(blocks):
            s = stride if block == 0 else 1
            add(width, size)  # bn1 after the 1x1 conv, at the block's input size
            size_out = size // s
            add(width, size_out)  # bn2 after the (strided) 3x3 conv
            add(out, size_out)  # bn3
            if block == 0 and (s != 1 or in_channels != out):
                add(out, size_out)  # downsample shortcut's BN
            size, in_channels = size_out, out
    return [BNCase(c, hw, hw, n) for (c, hw), n in counts.items()]


def training_bytes(case: BNCase, batch: int, itemsize: int, residual: bool = False) -> int:
    elements = batch * case.channels * case.height * case.width
    return elements * itemsize * (10 + (2 if residual else 0))  # residual: read fwd, write grad
