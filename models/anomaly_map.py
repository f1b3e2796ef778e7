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

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

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


@dataclass(frozen=True)
class MapStatistics:
    """What map 1 takes from the whole set of a class: the per-level maximum logp and the maximum of
    the summed, up-sampled normality ``sum_l exp(logp_l - level_max_l)``."""
    level_max: List[float]
    normality_max: float


def _normality(logps: Sequence[torch.Tensor], level_max: Sequence[float], size: int) -> torch.Tensor:
    return sum(_upsample((lp - m).exp(), size) for lp, m in zip(logps, level_max))


@torch.no_grad()
def map_statistics(chunks: Iterable[Sequence[torch.Tensor]], size: int = 224,
                   level_max: Optional[Sequence[float]] = None) -> MapStatistics:
    """:class:`MapStatistics` of per-level logp chunks (an iterable, read once, or twice when
    ``level_max`` is not given: pass a list then)."""
    chunks = list(chunks) if level_max is None else chunks
    if level_max is None:
        level_max = [max(float(chunk[level].max()) for chunk in chunks) for level in range(len(chunks[0]))]
    normality_max = max(float(_normality(chunk, level_max, size).max()) for chunk in chunks)
    return MapStatistics(list(level_max), normality_max)


@torch.no_grad()
def anomaly_maps(logps: Sequence[torch.Tensor], abnormal_probs: Sequence[torch.Tensor], size: int = 224,
                 sigma: float = 4.0, chunk: int = 64, statistics: Optional[MapStatistics] = None) -> torch.Tensor:
    """Fuse per-level maps of ALL test images of one class into (N, size, size) anomaly maps.

    ``logps`` and ``abnormal_probs`` are per-level (N, H_l, W_l) tensors.  ``statistics``: the
    set's :class:`MapStatistics` when the maps are a part of it (default: those of these maps).
    The result is float32 on the CPU.
    """
    level_max = statistics.level_max if statistics is not None else [lp.max() for lp in logps]
    n = logps[0].shape[0]
    # Written chunk by chunk into the one result array (the class's maps are its largest
    # object: 0.4 GB for 2,000 images at 224 px; a list of chunks, their concatenation and
    # the sum with the maximum were three of them at once).
    maps = torch.empty((n, size, size), dtype=torch.float32)
    global_max = None
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        normality = _normality([lp[part] for lp in logps], level_max, size)
        abnormality = sum(_upsample(pa[part], size) for pa in abnormal_probs) / len(abnormal_probs)
        chunk_max = normality.max()
        global_max = chunk_max if global_max is None else torch.maximum(global_max, chunk_max)
        maps[part] = gaussian_blur((abnormality - normality) / 2.0, sigma).cpu()
    if statistics is not None:
        global_max = torch.tensor(statistics.normality_max)
    if global_max is not None:
        maps += global_max.cpu() / 2.0
    return maps
