"""Anomaly maps of new images without labels, in passes whose memory does not grow with the images
(docs/method.md §11; the run: :mod:`utils.run.predict_run`).

ResAD's maps depend on the whole set of a class through a few statistics (§2.8, §2.9).  Pass 1
(:func:`score_images`) runs the model on every image and keeps its low-resolution per-level
outputs on disk (:class:`OutputStore`); :func:`set_statistics` reads them back for the set's
statistics; :func:`build_maps`, the one place that turns model outputs into maps, then gives any
chunk of images the maps it has in the whole set, which are the evaluation's maps.
:func:`leave_one_out_outputs` scores each reference against the other k-1 for a threshold.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from datasets import AnomalyDataset, Sample
from models.anomaly_map import (STANDARDIZED_TERMS, TERM_FIELDS, LevelMoments, MapStatistics, anomaly_maps,
                                level_moments, map_statistics, standardized_maps, standardized_terms)
from models.extractor import FeatureExtractor
from models.matching import ReferenceBank
from models.positions import unflatten_positions
from models.resad import LevelScores, ResAD
from utils.errors import UserError
from utils.run.loaders import make_loader
from utils.stages import staged

# The model outputs (fields of LevelScores) each map needs: the terms of the standardized maps
# (§2.9, TERM_FIELDS), -logp and the abnormal probability for the authors' maps (§2.8).
FUSED_KINDS = ("fused", "normality", "abnormality")
Statistics = Union[MapStatistics, List[LevelMoments]]


def needed_fields(kind: str) -> Tuple[str, ...]:
    """The :class:`LevelScores` fields the map ``kind`` (a single map of §2.9) is built from."""
    if kind in STANDARDIZED_TERMS:
        return tuple(dict.fromkeys(TERM_FIELDS[term] for term in STANDARDIZED_TERMS[kind]))
    if kind in FUSED_KINDS:
        return ("logps", "abnormal_probs")
    raise ValueError(f"unknown map kind {kind!r}")


def build_maps(outputs: LevelScores, kind: str, statistics: Optional[Statistics], size: int,
               sigma: float) -> torch.Tensor:
    """(N, size, size) maps ``kind`` of the N images of ``outputs``, standardized or normalised with the
    ``statistics`` of the set they belong to (:func:`set_statistics`; None: these images are the set)."""
    if kind in STANDARDIZED_TERMS:
        return standardized_maps(standardized_terms(outputs, kind), size=size, sigma=sigma, statistics=statistics)
    return anomaly_maps(outputs.logps, outputs.abnormal_probs, size=size, sigma=sigma, statistics=statistics,
                        kind=kind)


def set_statistics(chunks: Callable[[], Iterable[LevelScores]], kind: str, size: int) -> Statistics:
    """The statistics of a set given in chunks (``chunks()`` yields them afresh on every call) that
    :func:`build_maps` needs: per term the positions' mean and std (standardized maps), else the
    per-level maximum logp and the maximum normality (:class:`MapStatistics`)."""
    if kind in STANDARDIZED_TERMS:
        return [level_moments(standardized_terms(chunk, kind)[term] for chunk in chunks())
                for term in range(len(STANDARDIZED_TERMS[kind]))]
    level_max = None
    for chunk in chunks():
        found = [float(lp.max()) for lp in chunk.logps]
        level_max = found if level_max is None else [max(a, b) for a, b in zip(level_max, found)]
    return map_statistics((chunk.logps for chunk in chunks()), size, level_max)


class OutputStore:
    """The per-level model outputs of N images on disk: per needed field and level one file of N rows of
    (H_l, W_l) float32, written and read by image index.  Plain reads and writes rather than a memory map:
    the mapped pages of a run's outputs would count in the process's resident memory, which must not grow
    with the number of images."""

    def __init__(self, folder: str, count: int, feature_sizes: Sequence[Tuple[int, int]], fields: Sequence[str]):
        self.fields = tuple(fields)
        self.count = count
        self.sizes = [(int(h), int(w)) for h, w in feature_sizes]
        self.files = {(name, level): open(os.path.join(folder, f"{name}_{level}.f32"), "w+b")
                      for name in self.fields for level in range(len(self.sizes))}

    def put(self, indices: np.ndarray, outputs: LevelScores) -> None:
        for name in self.fields:
            for level, values in enumerate(getattr(outputs, name)):
                rows, handle = values.float().cpu().numpy(), self.files[name, level]
                for index, row in zip(indices.tolist(), rows):
                    handle.seek(index * row.nbytes)
                    handle.write(row.tobytes())

    def get(self, indices: np.ndarray) -> LevelScores:
        """The outputs of the images ``indices`` (the fields no map needs are empty lists)."""
        def level(name: str, number: int) -> torch.Tensor:
            (h, w), handle = self.sizes[number], self.files[name, number]
            rows = np.empty((len(indices), h, w), dtype=np.float32)
            for row, index in zip(rows, indices.tolist()):
                handle.seek(index * row.nbytes)
                handle.readinto(memoryview(row).cast("B"))
            return torch.from_numpy(rows)

        return LevelScores(*([level(name, n) for n in range(len(self.sizes))] if name in self.fields else []
                             for name in LevelScores._fields))

    def chunks(self, indices: np.ndarray, size: int) -> Iterator[LevelScores]:
        for start in range(0, len(indices), size):
            yield self.get(indices[start:start + size])

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()

    def __enter__(self) -> "OutputStore":
        return self

    def __exit__(self, *_) -> None:
        self.close()


class ReadableImages(AnomalyDataset):
    """:class:`AnomalyDataset` items plus ``error``: "" for an image that was read; for one that could not
    be, its one-line reason and a blank image instead of failing the whole batch."""

    def __getitem__(self, index: int) -> dict:
        try:
            return dict(super().__getitem__(index), error="")
        except UserError as err:
            sample, size = self.samples[index], self.image_size
            return {"image": torch.zeros(3, size, size), "mask": torch.zeros(1, size, size), "label": sample.label,
                    "class_name": sample.class_name, "path": sample.image, "error": str(err)}


def image_batches(samples: Sequence[Sample], extractor: FeatureExtractor, batch_size: int, num_workers: int,
                  desc: str) -> Iterator[Tuple[int, dict]]:
    """(index of the first image, batch) of ``samples`` in order, read by :class:`ReadableImages`."""
    loader = make_loader(samples, extractor, batch_size, num_workers, dataset_class=ReadableImages)
    start = 0
    for batch in tqdm(staged(loader, "loading"), total=len(loader), desc=desc, dynamic_ncols=True):
        yield start, batch
        start += len(batch["path"])


@torch.inference_mode()
def score_images(model: ResAD, extractor: FeatureExtractor, bank: ReferenceBank, samples: Sequence[Sample],
                 store: OutputStore, batch_size: int, num_workers: int, device: torch.device,
                 on_failure: Callable[[int, str], None]) -> np.ndarray:
    """Pass 1: the model's outputs of every readable image against all of ``bank``'s shots (as the
    evaluation computes them, :meth:`ResAD.forward_shots`) into ``store``; ``on_failure(index, reason)``
    for each unreadable one.  Returns which images were read."""
    model.eval()
    read = np.zeros(len(samples), dtype=bool)
    k = bank.num_shots
    for start, batch in image_batches(samples, extractor, batch_size, num_workers, "scoring"):
        good = [i for i, error in enumerate(batch["error"]) if not error]
        for i, error in enumerate(batch["error"]):
            if error:
                on_failure(start + i, error)
        if not good:
            continue
        images = batch["image"] if len(good) == len(batch["error"]) else batch["image"][good]
        features = extractor(images.to(device, non_blocking=True))
        indices = start + np.asarray(good)
        store.put(indices, model.forward_shots(features, bank, [k], nearest="nearest" in store.fields)[k])
        read[indices] = True
    return read


def reference_features(bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]], shot: int) -> List[torch.Tensor]:
    """Per level the (1, C, H, W) features of the reference ``shot`` of ``bank`` (image-major rows, §2.3)."""
    return [unflatten_positions(level[shot * h * w:(shot + 1) * h * w], 1, h, w)
            for level, (h, w) in zip(bank.levels, feature_sizes)]


@torch.inference_mode()
def leave_one_out_outputs(model: ResAD, bank: ReferenceBank, feature_sizes: Sequence[Tuple[int, int]],
                          flag: str = "--ref_images", nearest: bool = False) -> LevelScores:
    """The outputs of each of the k references scored against a bank of the other k-1 (§11); ``nearest``:
    with the distances to the nearest reference (:meth:`ResAD.forward_shots`)."""
    k = bank.num_shots
    if k < 2:
        raise UserError(f"{flag}: one reference image cannot score itself against the others; give at least "
                        "two references, or a fixed image threshold with --threshold X")
    model.eval()
    parts = []
    for shot in range(k):
        others = bank.select_shots([j for j in range(k) if j != shot])
        features = reference_features(bank, feature_sizes, shot)
        parts.append(model.forward_shots(features, others, [k - 1], nearest=nearest)[k - 1])
    return LevelScores(*([torch.cat([getattr(p, name)[level] for p in parts]) for level in range(len(feature_sizes))]
                         if getattr(parts[0], name) else [] for name in LevelScores._fields))


def reference_threshold(scores: np.ndarray, quantile: Optional[float]) -> float:
    """The maximum of the references' leave-one-out scores, or their ``quantile`` (linear interpolation)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(scores.max() if quantile is None else np.quantile(scores, quantile))


def input_image(image: torch.Tensor, extractor: FeatureExtractor) -> np.ndarray:
    """A pre-processed (3, S, S) image as the (S, S, 3) picture in [0, 1] that the map covers."""
    mean = torch.tensor(extractor.mean).view(3, 1, 1)
    std = torch.tensor(extractor.std).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
