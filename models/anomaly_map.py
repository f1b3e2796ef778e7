"""From per-level log-likelihood maps to pixel anomaly maps (docs/method.md §2.8).

* map 1: per level, ``exp(logp - max over the class's test set)``, bilinear
  up-sampling, sum over levels, then ``global max - map``;
* map 2: per level ``softmax([logp, logp_a])[abnormal]``, up-sampled, averaged;
* final map = mean of the Gaussian-smoothed (sigma 4) maps 1 and 2.

Smoothing is linear, so ``(G(m1) + G(m2)) / 2 = G((m1 + m2) / 2)`` and the
constant ``global max`` passes through it: each image is smoothed once, in
batches on the model's device.

Map 1 depends on the whole set through two numbers per class, the per-level
maximum log-likelihood and the maximum of the summed normality map
(:class:`MapStatistics`); :func:`map_statistics` computes them from any number of
chunks, so a set too large to hold can be scored in passes with the same result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _symmetric_pad(maps: torch.Tensor, radius: int) -> torch.Tensor:
    # scipy's mode="reflect" repeats the edge sample (d c b a | a b c d); torch's
    # "reflect" padding does not, so the border is built by hand.
    left, right = maps[..., :radius].flip(-1), maps[..., -radius:].flip(-1)
    maps = torch.cat([left, maps, right], dim=-1)
    top, bottom = maps[..., :radius, :].flip(-2), maps[..., -radius:, :].flip(-2)
    return torch.cat([top, maps, bottom], dim=-2)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of (N, H, W) maps, equal to ``scipy.ndimage.gaussian_filter``
    (``mode="reflect"``, ``truncate=4``) applied to each map."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(maps.device)
    radius = kernel.numel() // 2
    if radius > min(maps.shape[-2:]):
        raise ValueError(f"maps of size {tuple(maps.shape[-2:])} are too small for sigma {sigma}")
    padded = _symmetric_pad(maps.float(), radius).unsqueeze(1)
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1))
    return blurred.squeeze(1)


def _upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True).squeeze(1)


@torch.no_grad()
def summed_level_maps(levels: Sequence[torch.Tensor], size: int = 224, sigma: float = 4.0,
                      chunk: int = 64) -> torch.Tensor:
    """(N, size, size) float32 CPU maps: per-level (N, H_l, W_l) maps up-sampled (bilinear), summed over
    the levels and Gaussian-smoothed, ``chunk`` images at a time into one result array (a whole set in
    one piece holds several full-size copies, and the blur's convolution a buffer of kernel-width times
    that)."""
    n = levels[0].shape[0]
    maps = torch.empty((n, size, size), dtype=torch.float32)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        maps[part] = gaussian_blur(sum(_upsample(level[part].float(), size) for level in levels), sigma).cpu()
    return maps


@dataclass(frozen=True)
class MapStatistics:
    """What map 1 takes from the whole set of a class: the per-level maximum logp and the maximum of
    the summed, up-sampled normality ``sum_l exp(logp_l - level_max_l)``."""
    level_max: List[float]
    normality_max: float


def _normality(logps: Sequence[torch.Tensor], level_max: Sequence[float], size: int) -> torch.Tensor:
    return sum(_upsample((lp - m).exp(), size) for lp, m in zip(logps, level_max))


# Reduces a tensor of partial statistics over the processes of a job ("sum" or "max"); see set_statistics.
Merge = Callable[[torch.Tensor, str], torch.Tensor]


@torch.no_grad()
def map_statistics(chunks: Iterable[Sequence[torch.Tensor]], size: int = 224,
                   level_max: Optional[Sequence[float]] = None, merge: Optional[Merge] = None) -> MapStatistics:
    """:class:`MapStatistics` of per-level logp chunks (an iterable, read once, or twice when
    ``level_max`` is not given: pass a list then).  ``merge``: the chunks are one process's part of the
    set, and each maximum is merged over the processes."""
    chunks = list(chunks) if level_max is None else chunks
    if level_max is None:
        level_max = [max(float(chunk[level].max()) for chunk in chunks) for level in range(len(chunks[0]))]
    normality_max = max((float(_normality(chunk, level_max, size).max()) for chunk in chunks), default=-math.inf)
    if merge is not None:
        normality_max = float(merge(torch.tensor([normality_max], dtype=torch.float64), "max")[0])
    return MapStatistics(list(level_max), normality_max)


# The single maps of a ResAD evaluation: the authors' fused result, each of its two halves alone, and
# the standardized maps (§2.9).  "fused", "normality" and "abnormality" share anomaly_maps().
SINGLE_MAPS = ("fused", "normality", "abnormality", "standardized", "residual", "standardized_residual",
               "coarse_residual", "coarse_knn")
# The row names of the kNN baseline in the tables: its raw score (§6) and its score under the rule of
# the run's map (§6.1, :func:`normalized_baseline`).
KNN_MAPS = ("knn", "knn_normalized")
KNN_LABELS = {"knn": "kNN baseline", "knn_normalized": "kNN baseline, ResAD's rule"}
# --anomaly_map: the map a run scores with; "authors" is the fused map.
ANOMALY_MAP_RECIPES = {"authors": "fused", "standardized": "standardized",
                       "standardized_residual": "standardized_residual", "coarse_residual": "coarse_residual",
                       "coarse_knn": "coarse_knn"}
# --image_score: the maximum of the map (authors) or the mean of its top 1 % pixels.
IMAGE_SCORES = ("max", "mean_top1pct")


@torch.no_grad()
def anomaly_maps(logps: Sequence[torch.Tensor], abnormal_probs: Sequence[torch.Tensor], size: int = 224,
                 sigma: float = 4.0, chunk: int = 64, statistics: Optional[MapStatistics] = None,
                 kind: str = "fused") -> torch.Tensor:
    """Fuse per-level maps of ALL test images of one class into (N, size, size) anomaly maps.

    ``logps`` and ``abnormal_probs`` are per-level (N, H_l, W_l) tensors.  ``statistics``: the
    set's :class:`MapStatistics` when the maps are a part of it (default: those of these maps).
    ``kind``: "fused" (the authors' result), or one of its halves alone, "normality"
    (``global max - normality``) or "abnormality".  The result is float32 on the CPU.
    """
    if kind not in ("fused", "normality", "abnormality"):
        raise ValueError(f"unknown map kind {kind!r}")
    level_max = statistics.level_max if statistics is not None else [lp.max() for lp in logps]
    weights = {"fused": (0.5, 0.5), "normality": (1.0, 0.0), "abnormality": (0.0, 1.0)}[kind]
    n = logps[0].shape[0]
    # Written chunk by chunk into the one result array (the class's maps are its largest
    # object: 0.4 GB for 2,000 images at 224 px; a list of chunks, their concatenation and
    # the sum with the maximum were three of them at once).
    maps = torch.empty((n, size, size), dtype=torch.float32)
    global_max = None
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        normality = _normality([lp[part] for lp in logps], level_max, size)
        chunk_max = normality.max()
        global_max = chunk_max if global_max is None else torch.maximum(global_max, chunk_max)
        if kind == "fused":  # the authors' arithmetic, kept bit for bit
            abnormality = sum(_upsample(pa[part], size) for pa in abnormal_probs) / len(abnormal_probs)
            maps[part] = gaussian_blur((abnormality - normality) / 2.0, sigma).cpu()
        elif kind == "normality":
            maps[part] = gaussian_blur(-normality, sigma).cpu()
        else:
            abnormality = sum(_upsample(pa[part], size) for pa in abnormal_probs) / len(abnormal_probs)
            maps[part] = gaussian_blur(abnormality, sigma).cpu()
    if statistics is not None:
        global_max = torch.tensor(statistics.normality_max)
    if global_max is not None and weights[0]:
        maps += global_max.cpu() * weights[0]
    return maps


@dataclass(frozen=True)
class LevelMoments:
    """Per level, the mean and standard deviation of a score over every position of a set of images."""
    mean: List[float]
    std: List[float]


@torch.no_grad()
def level_moments(chunks: Iterable[Sequence[torch.Tensor]], merge: Optional[Merge] = None,
                  num_levels: Optional[int] = None) -> LevelMoments:
    """:class:`LevelMoments` of per-level (N, H_l, W_l) chunks (read once; float64 sums).  ``merge``: the
    chunks are one process's part of the set (perhaps none: give ``num_levels``), and the sums are merged."""
    sums = None
    for chunk in chunks:
        parts = torch.tensor([[float(c.numel()), c.double().sum().item(), c.double().square().sum().item()]
                              for c in chunk], dtype=torch.float64)
        sums = parts if sums is None else sums + parts
    if sums is None:
        sums = torch.zeros((num_levels, 3), dtype=torch.float64)
    if merge is not None:
        sums = merge(sums, "sum")
    mean = [s / n for n, s, _ in sums.tolist()]
    std = [max(q / n - m * m, 0.0) ** 0.5 for (n, _, q), m in zip(sums.tolist(), mean)]
    return LevelMoments(mean, [s if s > 0 else 1.0 for s in std])


# The standardized maps (§2.9): which per-level scores each one standardizes and sums.  "nll" is -logp
# of the flow, "norm" the constrained residual's |e|, "residual" the raw residual's magnitude |f - r|
# (the distance to the matched reference: training-free, close to the kNN baseline's score), "knn" the
# Euclidean distance to the nearest reference (the kNN baseline's score itself, §6).  "knn_standardized"
# and "coarse_knn_standardized" are the kNN baseline under ResAD's rule (§6.1): its distances alone,
# standardized per level like the maps that read them, on all levels or without the finest.
STANDARDIZED_TERMS = {"standardized": ("nll", "norm"), "residual": ("residual",),
                      "standardized_residual": ("nll", "norm", "residual"), "coarse_residual": ("nll", "residual"),
                      "coarse_knn": ("nll", "knn"), "knn_standardized": ("knn",),
                      "coarse_knn_standardized": ("knn",)}
# The model output (a field of models.resad.LevelScores) each term is read from.
TERM_FIELDS = {"nll": "logps", "norm": "norms", "residual": "distances", "knn": "nearest"}
# The maps that leave out the finest feature level (stride 4 with the CNN backbones), whose flow
# log-likelihood localises real defects worst (§2.9); a backbone with one level keeps it.
COARSE_MAPS = ("coarse_residual", "coarse_knn", "coarse_knn_standardized")
# The authors' map and its halves: map 1 normalised by two maxima, map 2 (§2.8).
FUSED_KINDS = ("fused", "normality", "abnormality")


def first_level(kind: str, num_levels: int) -> int:
    """The first feature level the map ``kind`` reads: 1 for the coarse maps (when there are several), else 0."""
    return 1 if kind in COARSE_MAPS and num_levels > 1 else 0


def normalized_baseline(kind: str) -> Optional[str]:
    """The kNN baseline under the rule of the map ``kind`` (its levels, standardized; §6.1), or None for
    a map that does not standardize (the authors' map and its halves)."""
    if kind not in STANDARDIZED_TERMS:
        return None
    return "coarse_knn_standardized" if kind in COARSE_MAPS else "knn_standardized"


def needed_fields(kind: str) -> Tuple[str, ...]:
    """The :class:`models.resad.LevelScores` fields the map ``kind`` is built from."""
    if kind in STANDARDIZED_TERMS:
        return tuple(dict.fromkeys(TERM_FIELDS[term] for term in STANDARDIZED_TERMS[kind]))
    if kind in FUSED_KINDS:
        return ("logps", "abnormal_probs")
    raise ValueError(f"unknown map kind {kind!r}")


def standardized_terms(outputs, kind: str) -> List[Sequence[torch.Tensor]]:
    """Per term of ``kind``, the per-level score maps of ``outputs`` (a :class:`models.resad.LevelScores`)."""
    first = first_level(kind, max(len(outputs.logps), len(outputs.nearest)))
    terms = []
    for term in STANDARDIZED_TERMS[kind]:
        maps = list(getattr(outputs, TERM_FIELDS[term]))[first:]
        if not maps or any(m is None for m in maps):
            raise ValueError(f"the map {kind!r} needs the model output {TERM_FIELDS[term]!r}, which was not computed")
        terms.append([-m for m in maps] if term == "nll" else maps)
    return terms


def needs_nearest(kind: str) -> bool:
    """Whether the map ``kind`` needs the distances to the nearest reference (one more search per batch)."""
    return "knn" in STANDARDIZED_TERMS.get(kind, ())


def nearest_levels(kinds: Iterable[str], num_levels: int) -> Optional[List[int]]:
    """The feature levels at which any of the maps ``kinds`` reads the distances to the nearest reference
    ("knn", the raw baseline, reads all); None when none does."""
    levels = set()
    for kind in kinds:
        if kind == "knn":
            levels.update(range(num_levels))
        elif needs_nearest(kind):
            levels.update(range(first_level(kind, num_levels), num_levels))
    return sorted(levels) or None


@torch.no_grad()
def standardized_statistics(chunks: Iterable[Sequence[Sequence[torch.Tensor]]]) -> List[LevelMoments]:
    """Per term, the :class:`LevelMoments` of a set given in chunks (each: per term, per-level maps)."""
    chunks = list(chunks)
    return [level_moments([chunk[term] for chunk in chunks]) for term in range(len(chunks[0]))]


@torch.no_grad()
def standardized_maps(terms: Sequence[Sequence[torch.Tensor]], size: int = 224, sigma: float = 4.0,
                      chunk: int = 64, statistics: Optional[Sequence[LevelMoments]] = None) -> torch.Tensor:
    """(N, size, size) maps of docs/method.md §2.9: each term's per-level score, standardized by its
    mean and std over the set's positions, up-sampled and summed over terms and levels, then
    Gaussian-smoothed.  ``statistics``: the whole set's, when ``terms`` are a part of it."""
    statistics = statistics or standardized_statistics([terms])
    z = [sum((term[level] - moments.mean[level]) / moments.std[level] for term, moments in zip(terms, statistics))
         for level in range(len(terms[0]))]
    return summed_level_maps(z, size=size, sigma=sigma, chunk=chunk)


Statistics = Union[MapStatistics, List[LevelMoments]]


@torch.no_grad()
def resad_maps(outputs, kind: str, size: int = 224, sigma: float = 4.0,
               statistics: Optional[Statistics] = None) -> torch.Tensor:
    """The (N, size, size) map ``kind`` of :data:`SINGLE_MAPS` of the N images of ``outputs`` (a
    :class:`models.resad.LevelScores`), normalised with ``statistics`` (:func:`set_statistics` of the set
    they belong to, or a class's calibration, :mod:`models.calibration`); None: these images are the set."""
    if kind in STANDARDIZED_TERMS:
        return standardized_maps(standardized_terms(outputs, kind), size=size, sigma=sigma, statistics=statistics)
    return anomaly_maps(outputs.logps, outputs.abnormal_probs, size=size, sigma=sigma, statistics=statistics,
                        kind=kind)


@torch.no_grad()
def set_statistics(chunks: Callable[[], Iterable], kind: str, size: int = 224, merge: Optional[Merge] = None,
                   num_levels: Optional[int] = None) -> Statistics:
    """The statistics :func:`resad_maps` needs of a set given in chunks of :class:`models.resad.LevelScores`
    (``chunks()`` yields them afresh on every call): per term the positions' mean and std (standardized
    maps), else the per-level maximum logp and the maximum normality (:class:`MapStatistics`).  ``merge``
    (with ``num_levels``, the model's): the chunks are one process's part of the set, and the sums and
    maxima are merged over the processes, which gives exactly the statistics of the whole set."""
    if kind in STANDARDIZED_TERMS:
        levels = None if num_levels is None else num_levels - first_level(kind, num_levels)
        return [level_moments((standardized_terms(chunk, kind)[term] for chunk in chunks()), merge, levels)
                for term in range(len(STANDARDIZED_TERMS[kind]))]
    level_max = None
    for chunk in chunks():
        found = [float(lp.max()) for lp in chunk.logps]
        level_max = found if level_max is None else [max(a, b) for a, b in zip(level_max, found)]
    if merge is not None:
        mine = torch.tensor(level_max if level_max is not None else [-math.inf] * num_levels, dtype=torch.float64)
        level_max = merge(mine, "max").tolist()
    return map_statistics((chunk.logps for chunk in chunks()), size, level_max, merge)


def image_scores(maps: torch.Tensor, rule: str = "max") -> torch.Tensor:
    """(N,) image scores of (N, H, W) maps: the maximum, or the mean of the top 1 % of the pixels."""
    flat = torch.as_tensor(maps).reshape(len(maps), -1)
    if rule == "max":
        return flat.max(dim=1).values
    if rule == "mean_top1pct":
        return flat.topk(max(1, flat.shape[1] // 100), dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score {rule!r}; choose from {IMAGE_SCORES}")
