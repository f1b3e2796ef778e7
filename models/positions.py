"""Feature maps as rows of positions: (B, C, H, W) <-> (B*H*W, C), image-major then row-major.

Matching, the VQ codebooks, the losses and the flows all work on one row per
position; reference banks are stored the same way (docs/method.md §2.3).
"""
from __future__ import annotations

import torch


def flatten_positions(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), image-major then row-major."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def unflatten_positions(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """(B*H*W, C) -> (B, C, H, W); inverse of :func:`flatten_positions`."""
    return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
