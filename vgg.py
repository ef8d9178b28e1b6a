"""VGG with batch normalisation for 32x32 images (Simonyan & Zisserman 2015), returning logits.

Every 3x3 convolution is a unit with its BN and ReLU (and the max-pool that follows it, where
one does); after five pools a 32x32 image is 1x1x512, and the classifier (two 512-wide hidden
layers with dropout, then the output layer) is the output unit. `freeze_units()` lists them
in forward order.
"""
from __future__ import annotations

import torch
from torch import nn

from layers import init_weights

# Output channels of each convolution, "M" a 2x2 max-pool (the configurations A, B, D, E).
CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


def config_for_depth(depth: int) -> list:
    """The layer configuration of VGG-`depth` (ValueError for a depth VGG does not have)."""
    if depth not in CONFIGS:
        raise ValueError(f"depth {depth} is not a VGG depth (choose 11, 13, 16 or 19)")
    return CONFIGS[depth]


class VGG(nn.Module):
    """VGG-L with BatchNorm.

    Args:
        depth: L, 11, 13, 16 or 19 weight layers (8, 10, 13 or 16 convolutions + 3 linear).
        num_classes: size of the output.
        dropout: drop rate before each hidden layer of the classifier.
    """

    def __init__(self, depth: int = 16, num_classes: int = 100, dropout: float = 0.0):
        super().__init__()
        units, channels = [], 3
        for item in config_for_depth(depth):
            if item == "M":
                units[-1].append(nn.MaxPool2d(2))
                continue
            units.append(nn.Sequential(nn.Conv2d(channels, item, 3, padding=1),
                                       nn.BatchNorm2d(item), nn.ReLU(inplace=True)))
            channels = item
        self.features = nn.Sequential(*units)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def freeze_units(self) -> list[nn.Module]:
        """FreezeOut units in forward order: each conv+BN+ReLU(+pool), the classifier."""
        return [*self.features, self.classifier]
