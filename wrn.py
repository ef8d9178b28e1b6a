"""Wide ResNet WRN-d-k for 32x32 images (Zagoruyko & Komodakis 2016), returning logits.

A stem convolution (16 channels), three groups of pre-activation basic blocks (16k, 32k and 64k
channels; the second and third start with stride 2), and a head (BN, ReLU, global average pool,
linear). `freeze_units()` lists the FreezeOut units in forward order: the stem, every residual
block, and the head as the output unit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers import Head, init_weights


class BasicBlock(nn.Module):
    """BN-ReLU-Conv3x3, dropout, BN-ReLU-Conv3x3, plus the shortcut. Where the shape changes,
    the shortcut is a 1x1 convolution of the block's pre-activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def blocks_per_group(depth: int) -> int:
    """A WRN of depth d has (d - 4) / 6 basic blocks in each of its three groups."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth {depth} is not a valid Wide ResNet depth: (d - 4) must be a "
                         f"positive multiple of 6 (e.g. 16, 28 or 40)")
    return (depth - 4) // 6


class WideResNet(nn.Module):
    """WRN-d-k.

    Args:
        depth: d, the number of convolutional and linear layers (16, 28, 40, ...).
        widen_factor: k, the width multiplier of the three groups (16k, 32k, 64k channels).
        num_classes: size of the output.
        dropout: drop rate between the two convolutions of every block.
    """

    def __init__(self, depth: int = 40, widen_factor: int = 4, num_classes: int = 100,
                 dropout: float = 0.0):
        super().__init__()
        n = blocks_per_group(depth)
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        blocks, channels = [], 16
        for group, width in enumerate(widths):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, dropout))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def freeze_units(self) -> list[nn.Module]:
        """FreezeOut units in forward order: stem, each residual block, head."""
        return [self.stem, *self.blocks, self.head]
