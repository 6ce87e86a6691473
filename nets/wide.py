"""A small example network: one wide 5x5 convolution with stride 2, batch norm, ReLU, 2x2 max-pool, and a
linear head. Trained by `dvc exp run -S train.model=nets/wide.py:WideNet`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_shape: tuple[int, int], width: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=5, stride=2, padding=2, bias=False)
        self.norm = nn.BatchNorm2d(width)
        height, breadth = image_shape[0] // 4, image_shape[1] // 4  # halved by the stride, then by the pool
        self.head = nn.Linear(width * height * breadth, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)  # (B, width, H/4, W/4)
        return self.head(x.flatten(1))  # (B, classes)
