"""A class calibrated from its k references alone (docs/method.md §2.10): everything a map needs to score
one image on its own, and the reference threshold.

ResAD's maps are normalised by statistics of a set of images (map 1's two maxima, §2.8; the per-level
means and deviations of the standardized maps, §2.9).  Taken over the images being scored, they make an
image's score depend on its neighbours.  A :class:`Calibration` takes them, once per class, model and
references, from the references instead:

* **reference outputs** (:func:`reference_outputs`): with k >= 2 each reference is scored against the
  other k-1 (leave-one-out), as an unseen normal image is scored against k; with k = 1 the reference is
  scored against itself, each position barred from matching the positions of its own neighbourhood
  (:data:`SELF_EXCLUSION_RADIUS` cells of its level around it), so that it matches the most similar
  *other* part of the image;
* **statistics** per map kind: :func:`models.anomaly_map.set_statistics` of those outputs;
* **reference scores** per map kind and image-score rule: the references' image scores under those
  statistics; the threshold is their maximum (or a quantile).

Pure tensors in, plain values out; the file that keeps a calibration is
:mod:`utils.formats.calibration`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from models.anomaly_map import IMAGE_SCORES, Statistics, image_scores, nearest_levels, resad_maps, set_statistics
from models.knn_baseline import knn_level_maps
from models.matching import ReferenceBank
from models.positions import flatten_positions, unflatten_positions
from models.resad import LevelScores
from models.residual import residual_features

# Where the statistics of the maps come from: the set of images scored together (the authors' protocol,
# an image's score depends on the others), or the class's references (this module: it does not).
NORMALIZATIONS = ("set", "references")

# k = 1: a reference position may not match the positions within this many cells (Chebyshev distance,
# at every level) of itself; 0 bars the position alone (docs/method.md §2.10, measured there).
SELF_EXCLUSION_RADIUS = 1


def reference_rule(shots: int) -> str:
    """The name of the rule that scores ``shots`` references: "leave_one_out" (each against the other k-1)
    or, for one reference, "self_excluded" (against itself outside each position's neighbourhood)."""
    return "leave_one_out" if shots >= 2 else "self_excluded"


def reference_features(bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]], shot: int) -> List[torch.Tensor]:
    """Per level the (1, C, H, W) features of the reference ``shot`` of ``bank`` (image-major rows, §2.3)."""
    return [unflatten_positions(level[shot * h * w:(shot + 1) * h * w], 1, h, w)
            for level, (h, w) in zip(bank.levels, feature_sizes)]


def _stack(parts: Sequence, fields: Sequence[str]):
    """The per-image outputs ``parts`` (each a LevelScores of one image) as one LevelScores of all of them."""
    first = parts[0]
    stacked = {}
    for name in fields:
        levels = getattr(first, name)
        stacked[name] = [None if levels[level] is None else torch.cat([getattr(p, name)[level] for p in parts])
                         for level in range(len(levels))]
    return first._replace(**stacked)


@torch.inference_mode()
def reference_outputs(model, bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]],
                      nearest_levels: Optional[Sequence[int]] = None):
    """The :class:`models.resad.LevelScores` of the k references of ``bank`` under :func:`reference_rule`;
    ``nearest_levels``: with the distances to the nearest (other) reference at these levels."""
    model.eval()
    k = bank.num_shots
    if k == 1:
        return _self_excluded_outputs(model, bank, feature_sizes, nearest_levels)
    parts = []
    for shot in range(k):
        others = bank.select_shots([j for j in range(k) if j != shot])
        features = reference_features(bank, feature_sizes, shot)
        parts.append(model.forward_shots(features, others, [k - 1], nearest_levels=nearest_levels)[k - 1])
    return _stack(parts, parts[0]._fields if nearest_levels is not None else parts[0]._fields[:4])


@torch.inference_mode()
def reference_nearest(bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]],
                      levels: Sequence[int]) -> List[Optional[torch.Tensor]]:
    """Per level, the (k, H, W) distances of each reference's features to the nearest feature of the others
    (k = 1: of its own positions outside its neighbourhood), None at the levels not in ``levels``: the kNN
    baseline's reference outputs, without a model."""
    k = bank.num_shots
    if k == 1:
        features = reference_features(bank, feature_sizes, 0)
        return [_self_excluded_match(f)[1] if level in levels else None for level, f in enumerate(features)]
    parts = []
    for shot in range(k):
        others = bank.select_shots([j for j in range(k) if j != shot])
        parts.append(knn_level_maps(reference_features(bank, feature_sizes, shot), others, [k - 1],
                                    levels=levels)[k - 1])
    return [None if parts[0][level] is None else torch.cat([p[level] for p in parts])
            for level in range(len(feature_sizes))]


def _self_excluded_match(feature: torch.Tensor, radius: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a (1, C, H, W) feature map, the (1, C, H, W) map of each position's most cosine-similar feature
    among the positions farther than ``radius`` cells from it, and the (1, H, W) Euclidean distance to the
    nearest such feature.  A brute-force product of the H*W positions with each other (one image: at most
    a few thousand rows), which the tiled search of :class:`models.matching.Matcher` has no mask for.
    ``radius``: default :data:`SELF_EXCLUSION_RADIUS`."""
    radius = SELF_EXCLUSION_RADIUS if radius is None else radius
    _, _, h, w = feature.shape
    rows = flatten_positions(feature).float()
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1).to(rows.device), xs.reshape(-1).to(rows.device)
    barred = ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)
    if bool(barred.all()):
        raise ValueError(f"a {h}x{w} feature map has no position outside a radius of {radius}")
    unit = F.normalize(rows, dim=1)
    similarity = (unit @ unit.t()).masked_fill_(barred, -float("inf"))
    matched = rows[similarity.argmax(dim=1)]
    distance = torch.cdist(rows.double(), rows.double()).masked_fill_(barred, float("inf")).min(dim=1).values
    return unflatten_positions(matched, 1, h, w), distance.float().view(1, h, w)


def _self_excluded_outputs(model, bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]],
                           nearest_levels: Optional[Sequence[int]]):
    features = reference_features(bank, feature_sizes, 0)
    found = [_self_excluded_match(f) for f in features]
    scores = model.score_residuals(residual_features(features, [m for m, _ in found], model.config.residual))
    if nearest_levels is None:
        return scores
    return scores._replace(nearest=[d if level in nearest_levels else None for level, (_, d) in enumerate(found)])


@dataclass(frozen=True)
class Calibration:
    """A class's calibration: per map kind the statistics of :func:`models.anomaly_map.resad_maps`, per
    image-score rule the references' own image scores under them, and the (min, max) of the references' maps."""
    shots: int
    rule: str
    statistics: Dict[str, Statistics]
    reference_scores: Dict[str, Dict[str, List[float]]]
    reference_range: Dict[str, Tuple[float, float]]

    def threshold(self, kind: str, image_score: str, quantile: Optional[float] = None) -> float:
        """The maximum of the references' scores of map ``kind`` under ``image_score``, or their
        ``quantile`` (linear interpolation)."""
        scores = np.asarray(self.reference_scores[kind][image_score], dtype=np.float64)
        return float(scores.max() if quantile is None else np.quantile(scores, quantile))


@torch.no_grad()
def calibrate(outputs, kinds: Sequence[str], shots: int, size: int = 224, sigma: float = 4.0) -> Calibration:
    """The :class:`Calibration` of the maps ``kinds`` from the references' outputs (:func:`reference_outputs`,
    or a LevelScores of :func:`reference_nearest` alone for the baseline's kinds)."""
    statistics, scores, ranges = {}, {}, {}
    for kind in dict.fromkeys(kinds):
        statistics[kind] = set_statistics(lambda: [outputs], kind, size)
        maps = resad_maps(outputs, kind, size=size, sigma=sigma, statistics=statistics[kind])
        scores[kind] = {rule: image_scores(maps, rule).double().tolist() for rule in IMAGE_SCORES}
        ranges[kind] = (float(maps.min()), float(maps.max()))
    return Calibration(shots, reference_rule(shots), statistics, scores, ranges)


def calibrate_model(model, bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]], kinds: Sequence[str],
                    size: int = 224, sigma: float = 4.0) -> Calibration:
    """:func:`calibrate` of the maps ``kinds`` of ``model`` on the references of ``bank``."""
    levels = nearest_levels(kinds, len(feature_sizes))
    return calibrate(reference_outputs(model, bank, feature_sizes, levels), kinds, bank.num_shots, size, sigma)


def calibrate_baseline(bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]], kinds: Sequence[str],
                       size: int = 224, sigma: float = 4.0) -> Calibration:
    """:func:`calibrate` of the kNN baseline's standardized maps ``kinds`` (no model: the distances alone)."""
    levels = nearest_levels(kinds, len(feature_sizes))
    outputs = LevelScores([], [], [], [], nearest=reference_nearest(bank, feature_sizes, levels))
    return calibrate(outputs, kinds, bank.num_shots, size, sigma)
