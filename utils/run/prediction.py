"""Anomaly maps of new images normalised by the set they belong to (``predict.py --normalization set``), in
passes whose memory does not grow with the images (docs/method.md §11; the run: :mod:`utils.run.predict_run`).

Pass 1 (:func:`score_images`) runs the model on every image and keeps its low-resolution per-level
outputs on disk (:class:`OutputStore`); :func:`models.anomaly_map.set_statistics` reads them back for the
set's statistics; :func:`models.anomaly_map.resad_maps` then gives any chunk of images the maps it has in
the whole set, which are the evaluation's maps.  :class:`ReadableImages` and :func:`image_batches` read the
images of both normalisations.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets import AnomalyDataset, Sample
from models.extractor import FeatureExtractor
from models.matching import ReferenceBank
from models.resad import LevelScores, ResAD
from utils.errors import UserError
from utils.run.loaders import make_loader
from utils.stages import staged


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
                 on_failure: Callable[[int, str], None], indices: Optional[np.ndarray] = None) -> np.ndarray:
    """Pass 1: the model's outputs of every readable image against all of ``bank``'s shots (as the
    evaluation computes them, :meth:`ResAD.forward_shots`) into ``store``; ``on_failure(index, reason)``
    for each unreadable one.  ``indices``: score only these images (a rank's share).  Returns which
    images were read."""
    model.eval()
    read = np.zeros(len(samples), dtype=bool)
    indices = np.arange(len(samples)) if indices is None else np.asarray(indices)
    k = bank.num_shots
    for start, batch in image_batches([samples[i] for i in indices], extractor, batch_size, num_workers, "scoring"):
        rows = indices[start:start + len(batch["error"])]
        good = [i for i, error in enumerate(batch["error"]) if not error]
        for i, error in enumerate(batch["error"]):
            if error:
                on_failure(int(rows[i]), error)
        if not good:
            continue
        images = batch["image"] if len(good) == len(batch["error"]) else batch["image"][good]
        features = extractor(images.to(device, non_blocking=True))
        levels = list(range(len(features))) if "nearest" in store.fields else None
        store.put(rows[good], model.forward_shots(features, bank, [k], nearest_levels=levels)[k])
        read[rows[good]] = True
    return read


def rank_batches(count: int, batch_size: int, rank: int, world_size: int) -> List[np.ndarray]:
    """The batches of ``count`` images (in order, ``batch_size`` each) that rank ``rank`` of ``world_size``
    scores: every ``world_size``-th, from its own rank on, so that round j's batches, one per rank, are the
    run's batches ``j * world_size`` to ``j * world_size + world_size - 1`` in order."""
    starts = range(rank * batch_size, count, world_size * batch_size)
    return [np.arange(start, min(count, start + batch_size)) for start in starts]


def input_image(image: torch.Tensor, extractor: FeatureExtractor) -> np.ndarray:
    """A pre-processed (3, S, S) image as the (S, S, 3) picture in [0, 1] that the map covers."""
    mean = torch.tensor(extractor.mean).view(3, 1, 1)
    std = torch.tensor(extractor.std).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
