"""A training-free baseline on the same references: exact nearest-neighbour feature distances (docs/method.md §6).

Per feature level, each test position's score is the Euclidean distance of its
feature to the nearest row of the class's reference bank (PatchCore-style, exact,
no coreset); the per-level maps are bilinearly up-sampled to the image size,
summed over levels and smoothed like ResAD's maps (:func:`models.anomaly_map.summed_level_maps`).
The image score is the maximum of the map, as for ResAD.

The nearest rows come from the tiled search that matches ResAD's features
(:meth:`models.matching.Matcher.nearest_euclidean_by_shots`), once per batch for every
number of shots k (the first k shots of one bank).  Only the small per-level maps are
kept per image; the full-size maps are made chunk by chunk at the end.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from utils.stages import stage

from .anomaly_map import summed_level_maps
from .matching import DEFAULT_MATCHER, Matcher, ReferenceBank
from .positions import flatten_positions

BASELINES = ("knn",)


@torch.no_grad()
def nearest_distances_by_shots(queries: torch.Tensor, bank: torch.Tensor, num_shots: int, shots: Sequence[int],
                               matcher: Optional[Matcher] = None) -> Dict[int, torch.Tensor]:
    """For every k in ``shots``, the (N,) Euclidean distances of the rows of ``queries`` (N, C) to their
    nearest row among the first k shots of ``bank`` (``num_shots`` images of equal size, image-major).

    The nearest row is found by the matcher's tiled search; the distance to it is then recomputed
    directly as ``|q - b|``, so that close matches do not suffer from the cancellation of the expansion.
    """
    if queries.shape[0] == 0:
        return {int(k): queries.new_zeros(0) for k in shots}
    indices = (matcher or DEFAULT_MATCHER).nearest_euclidean_by_shots(queries, bank, num_shots, shots)
    return {k: (queries - bank[index]).norm(dim=1) for k, index in indices.items()}


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, matcher: Optional[Matcher] = None) -> torch.Tensor:
    """Euclidean distance of every row of ``queries`` (N, C) to its nearest row of ``bank`` (M, C): (N,)."""
    return nearest_distances_by_shots(queries, bank, 1, [1], matcher)[1]


@torch.no_grad()
def knn_level_maps(features: Sequence[torch.Tensor], bank: ReferenceBank, shots: Optional[Sequence[int]] = None,
                   matcher: Optional[Matcher] = None,
                   levels: Optional[Sequence[int]] = None) -> Dict[int, List[Optional[torch.Tensor]]]:
    """Per k of ``shots`` (default: all of the bank's), per level, the (B, H_l, W_l) map of the distances of
    a batch of features to their nearest reference among the first k shots of ``bank``.  ``levels``: search
    only these levels (default all); the others' maps are None."""
    shots = [bank.num_shots] if shots is None else shots
    wanted = set(range(len(features)) if levels is None else levels)
    maps: Dict[int, List[Optional[torch.Tensor]]] = {int(k): [] for k in shots}
    for level, (feature, rows) in enumerate(zip(features, bank.levels)):
        if level not in wanted:
            for found in maps.values():
                found.append(None)
            continue
        b, _, h, w = feature.shape
        distances = nearest_distances_by_shots(flatten_positions(feature), rows.to(feature.device), bank.num_shots,
                                               shots, matcher)
        for k, found in distances.items():
            maps[k].append(found.view(b, h, w))
    return maps


@torch.no_grad()
def knn_anomaly_maps(level_maps: Sequence[torch.Tensor], size: int = 224, sigma: float = 4.0,
                     chunk: int = 64) -> torch.Tensor:
    """(N, size, size) CPU maps: per-level distance maps up-sampled (bilinear), summed, Gaussian-smoothed,
    ``chunk`` images at a time."""
    return summed_level_maps(level_maps, size=size, sigma=sigma, chunk=chunk)


class KnnAccumulator:
    """Collects the per-level distance maps of one class's test batches, for every number of shots at once."""

    def __init__(self, shots: Sequence[int], matcher: Optional[Matcher] = None):
        self.matcher = matcher
        self.levels: Dict[int, List[List[torch.Tensor]]] = {int(k): [] for k in shots}

    def add(self, features: Sequence[torch.Tensor], bank: ReferenceBank) -> None:
        """Score a batch against the first k shots of ``bank`` for every k, in one search."""
        if not self.levels:
            return
        with stage("kNN search"):
            found = knn_level_maps(features, bank, list(self.levels), self.matcher)
        self.add_found(found)

    def add_found(self, found: Dict[int, List[torch.Tensor]]) -> None:
        """Keep a batch's per-level distance maps found elsewhere (``found[k]``: :func:`knn_level_maps`'s
        maps for k shots, e.g. ResAD's :attr:`LevelScores.nearest`), for every k this accumulator keeps."""
        for k in self.levels:
            self.levels[k].append([m.cpu() for m in found[k]])

    def level_maps(self, shots: int) -> List[torch.Tensor]:
        """Per level, the (N, H_l, W_l) distance maps of every batch kept for ``shots``."""
        return [torch.cat(level) for level in zip(*self.levels[shots])]

    def maps(self, shots: int, size: int, sigma: float) -> torch.Tensor:
        with stage("kNN maps"):
            return knn_anomaly_maps(self.level_maps(shots), size=size, sigma=sigma)
