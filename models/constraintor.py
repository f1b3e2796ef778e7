"""The feature constraintor: per level Conv3x3 + BatchNorm + ReLU (docs/method.md §2.6).

It maps residual features into a compact normal region; it is trained with the
log-barrier bidirectional OCC loss of :func:`models.losses.occ_loss`.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn


def conv_bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                         nn.BatchNorm2d(channels), nn.ReLU())


class FeatureConstraintor(nn.Module):
    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.levels = nn.ModuleList([conv_bn_relu(c) for c in channels])

    def forward(self, residuals: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [block(r) for block, r in zip(self.levels, residuals)]
