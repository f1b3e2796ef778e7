"""A training-free baseline on the same references: exact nearest-neighbour feature distances.

Per feature level, each test position's score is the Euclidean distance of its
feature to the nearest row of the class's reference bank (PatchCore-style, exact,
no coreset); the per-level maps are bilinearly up-sampled to the image size,
summed over levels and smoothed like ResAD's maps (:func:`models.anomaly_map.gaussian_blur`).
The image score is the maximum of the map, as for ResAD.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .anomaly_map import gaussian_blur
from .matching import ReferenceBank
from .positions import flatten_positions

BASELINES = ("knn",)


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """Euclidean distance of every row of ``queries`` (N, C) to its nearest row of ``bank`` (M, C): (N,).

    The nearest row is searched exhaustively with ``|q|^2 - 2 q.b + |b|^2`` in blocks
    of queries; the distance to it is then recomputed directly as ``|q - b|``, so
    that close matches do not suffer from the cancellation of the expansion.
    """
    bank_sq = (bank * bank).sum(dim=1)
    out = []
    for part in queries.split(block):
        squared = (part * part).sum(dim=1, keepdim=True) - 2.0 * part @ bank.T + bank_sq
        nearest = squared.argmin(dim=1)
        out.append((part - bank[nearest]).norm(dim=1))
    return torch.cat(out) if out else queries.new_zeros(0)


@torch.no_grad()
def knn_level_maps(features: Sequence[torch.Tensor], bank: ReferenceBank) -> List[torch.Tensor]:
    """Per level, the (B, H_l, W_l) map of nearest-reference distances of a batch of features."""
    maps = []
    for feature, rows in zip(features, bank.levels):
        b, _, h, w = feature.shape
        maps.append(nearest_distances(flatten_positions(feature), rows.to(feature.device)).view(b, h, w))
    return maps


@torch.no_grad()
def knn_anomaly_maps(level_maps: Sequence[torch.Tensor], size: int = 224, sigma: float = 4.0) -> torch.Tensor:
    """(N, size, size) maps: per-level distance maps up-sampled (bilinear), summed, Gaussian-smoothed (CPU)."""
    total = sum(F.interpolate(m.unsqueeze(1).float(), size=(size, size), mode="bilinear",
                              align_corners=True).squeeze(1) for m in level_maps)
    return gaussian_blur(total, sigma).cpu()


class KnnAccumulator:
    """Collects the per-level distance maps of one class's test batches, per number of shots."""

    def __init__(self, shots: Sequence[int]):
        self.levels: Dict[int, List[List[torch.Tensor]]] = {k: [] for k in shots}

    def add(self, features: Sequence[torch.Tensor], banks: Dict[int, ReferenceBank]) -> None:
        for k, bank in banks.items():
            self.levels[k].append([m.cpu() for m in knn_level_maps(features, bank)])

    def maps(self, shots: int, size: int, sigma: float) -> torch.Tensor:
        batches = self.levels[shots]
        return knn_anomaly_maps([torch.cat(level) for level in zip(*batches)], size=size, sigma=sigma)
