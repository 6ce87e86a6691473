"""The three built-in networks in plain torch.nn, as a network of your own is written (nets/).

Each takes float maps (B, 1, H, W), already normalised (stages.core.model.Normalised wraps it), and
returns logits (B, classes). On the CPU the stages run them inside stages.core.pinning's context, which
gives their products and convolutions the same bytes on every machine: nothing here knows of it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`logreg` (no hidden widths) and `mlp`: linear layers between the widths, a ReLU between each two."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, C*H*W)
        *hidden, last = self.layers
        for layer in hidden:
            x = F.relu(layer(x))
        return last(x)  # (B, classes)


class CNN(nn.Module):
    """`cnn`: per width of `channels` a 3x3 convolution (no bias: batch norm follows), 2x2 max-pool, batch
    norm and ReLU; then an MLP of `hidden` widths over the flattened maps.

    Pooling before the norm and the ReLU (as airbench's fast CIFAR-10 blocks do) runs those two on a quarter
    of the positions; ReLU commutes with the max, so only the norm sees other numbers. No dropout: its masks
    come from the device's generator, so a GPU run would train another model than a CPU run; batch norm
    regularises instead, and lets a higher learning rate converge in few epochs.
    """

    def __init__(
        self, channels: tuple[int, ...], hidden: tuple[int, ...], num_classes: int, image_shape: tuple[int, int]
    ) -> None:
        super().__init__()
        widths = [1, *channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for width in channels)
        height, width = (side // 2 ** len(channels) for side in image_shape)
        self.head = MLP([channels[-1] * height * width, *hidden, num_classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.relu(norm(F.max_pool2d(conv(x), 2)))  # (B, C, H, W) -> (B, C', H/2, W/2)
        return self.head(x)  # (B, classes)
