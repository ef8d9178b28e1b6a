"""DenseNet and DenseNet-BC for 32x32 images (Huang et al. 2017), returning logits.

The network is a stem convolution, three dense blocks separated by transitions, and a head
(BN, ReLU, global average pool, linear). `freeze_units()` lists the FreezeOut units in forward
order: the stem, every dense layer, every transition, and the head as the output unit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers import Head, init_weights


class BottleneckLayer(nn.Module):
    """BN-ReLU-Conv1x1 (4k channels) then BN-ReLU-Conv3x3 (k channels); output is the
    input with the k new feature maps concatenated."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float = 0.0):
        super().__init__()
        inner = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, inner, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.dropout(self.conv2(F.relu(self.bn2(out))))
        return torch.cat([x, out], 1)


class SingleLayer(nn.Module):
    """BN-ReLU-Conv3x3 (k channels), concatenated to the input (DenseNet without bottleneck)."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.dropout(self.conv(F.relu(self.bn(x))))], 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 to compress the channels, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.dropout(self.conv(F.relu(self.bn(x)))), 2)


def layers_per_block(depth: int, bottleneck: bool = True) -> int:
    """Dense layers in each of the three blocks for a total depth L.

    L counts every convolution plus the stem, the two transitions and the classifier, leaving
    (L - 4) / 3 convolutions per block; a bottleneck layer has two of them, so a block has
    (L - 4) / 6 layers with bottlenecks and (L - 4) / 3 without.
    """
    per_layer = 6 if bottleneck else 3
    if depth < 4 + per_layer or (depth - 4) % per_layer:
        kind = "DenseNet-BC (bottleneck)" if bottleneck else "DenseNet without bottleneck"
        raise ValueError(f"depth {depth} is not a valid {kind} depth: (L - 4) must be a positive "
                         f"multiple of {per_layer} (e.g. {4 + per_layer * 12} or {4 + per_layer * 16})")
    return (depth - 4) // per_layer


class DenseNet(nn.Module):
    """DenseNet(-BC) for CIFAR-sized inputs.

    Args:
        depth: L, the network depth (76, 100, 190 in the paper); with bottlenecks each block
            has (L - 4) / 6 layers.
        growth_rate: k, feature maps added by every dense layer; the stem has 2k.
        num_classes: size of the output.
        bottleneck: DenseNet-BC's 1x1 bottleneck (4k channels) before every 3x3 convolution.
        reduction: transition compression theta (0.5 for DenseNet-BC, 1 without compression).
        dropout: drop rate after every convolution of dense layers and transitions.
    """

    def __init__(self, depth: int = 76, growth_rate: int = 12, num_classes: int = 100,
                 bottleneck: bool = True, reduction: float = 0.5, dropout: float = 0.0):
        super().__init__()
        n_layers = layers_per_block(depth, bottleneck)
        layer_cls = BottleneckLayer if bottleneck else SingleLayer
        channels = 2 * growth_rate
        self.stem = nn.Conv2d(3, channels, kernel_size=3, padding=1, bias=False)
        layers: list[nn.Module] = []
        for block in range(3):
            for _ in range(n_layers):
                layers.append(layer_cls(channels, growth_rate, dropout))
                channels += growth_rate
            if block < 2:
                out_channels = int(math.floor(channels * reduction))
                layers.append(Transition(channels, out_channels, dropout))
                channels = out_channels
        # One flat sequence keeps the forward order (= the FreezeOut unit order) visible.
        self.layers = nn.Sequential(*layers)
        self.head = Head(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))

    def freeze_units(self) -> list[nn.Module]:
        """FreezeOut units in forward order: stem, each dense layer and transition, head."""
        return [self.stem, *self.layers, self.head]
