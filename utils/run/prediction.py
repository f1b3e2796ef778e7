"""The pieces of ``predict.py``'s runs (the run: :mod:`utils.run.predict_run`): reading images, the files of a
run (raw maps, heat-map titles, the run record), and the passes of ``--normalization set``, whose maps are
normalised by the set they belong to, in memory that does not grow with the images (docs/method.md §11).

Pass 1 (:func:`score_images`) runs the model on every image and keeps its low-resolution per-level
outputs on disk (:class:`OutputStore`); :func:`models.anomaly_map.set_statistics` reads them back for the
set's statistics; :func:`models.anomaly_map.resad_maps` then gives any chunk of images the maps it has in
the whole set, which are the evaluation's maps.  :class:`ReadableImages` and :func:`image_batches` read the
images of both normalisations.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets import AnomalyDataset, Sample
from models.anomaly_map import image_scores, nearest_levels, needed_fields, resad_maps, set_statistics
from models.calibration import reference_outputs
from models.extractor import FeatureExtractor
from models.matching import ReferenceBank
from models.resad import LevelScores, ResAD
from utils import distributed
from utils.atomic import atomic_path, save_json
from utils.errors import UserError
from utils.formats.predictions import ScoresWriter, judge
from utils.report import run_record
from utils.report.plots import PredictionHeatmaps
from utils.run.loaders import make_loader
from utils.stages import staged

if TYPE_CHECKING:
    from utils.run.predict_run import PredictionInputs


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


# --------------------------------------------------------------------------- the files of a run, and the set's passes

def save_record(inputs: "PredictionInputs", record: dict) -> None:
    if inputs.scorer.ranks.primary:   # under torchrun rank 0 writes
        save_json(inputs.outputs.run_record(), record)


def heatmap_title(name: str, score: float, threshold: float) -> str:
    return (f"{name}: image score {score:.4g} {'>' if score > threshold else '<='} threshold {threshold:.4g}: "
            f"{judge(score, threshold)}")


def save_map(path: str, values: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, values.numpy().astype(np.float16))


def prediction_record(inputs: "PredictionInputs", identity: dict, threshold: dict, images: dict, seconds: dict) -> dict:
    cfg, scorer = inputs.config, inputs.scorer
    state = scorer.state
    if not threshold:
        threshold = {"value": scorer.threshold, "from": "--threshold" if cfg.threshold is not None else "references"}
        if cfg.threshold is None and scorer.calibration is not None:
            threshold.update(rule="max" if cfg.threshold_quantile is None else f"quantile {cfg.threshold_quantile:g}",
                             reference_scores=scorer.calibration.reference_scores[scorer.kind][cfg.image_score])
    return run_record.prediction_record(
        cfg.arguments, cfg.seed, scorer.device, identity=identity,
        checkpoint={"path": os.path.abspath(cfg.checkpoint), "epoch": int(state.get("epoch", 0)),
                    "trained_on": state["trained_on"], "model_config": state.get("model_config")},
        references=scorer.references, calibration=scorer.calibration_record,
        images=images,
        maps={"anomaly_map": cfg.anomaly_map, "kind": scorer.kind, "image_score": cfg.image_score,
              "normalization": cfg.normalization, "smooth_sigma": cfg.smooth_sigma, "fdm_alpha": cfg.fdm_alpha,
              "resize": scorer.extractor.resize},
        threshold=threshold, seconds=seconds, distributed=scorer.ranks.describe())


# --------------------------------------------------------------------------- the set's statistics

def set_passes(inputs: "PredictionInputs", started: float) -> dict:
    """``--normalization set``: score every image into a scratch store, the set's statistics and the
    threshold, then ``scores.csv`` (the run record beside it), then the heat-maps; returns the run record.
    Under torchrun each rank scores every world_size-th batch, the statistics are merged exactly over the
    ranks (sums and maxima) and rank 0 writes ``scores.csv`` in input order."""
    cfg, scorer, n = inputs.config, inputs.scorer, len(inputs.samples)
    ranks = scorer.ranks
    mine = np.concatenate(rank_batches(n, cfg.batch_size, ranks.rank, ranks.world_size) or [np.zeros(0, int)])
    with inputs.outputs.scratch() as scratch, OutputStore(scratch, n, scorer.extractor.feature_sizes,
                                                          needed_fields(inputs.kind)) as store:
        read = score_images(scorer.model, scorer.extractor, scorer.bank, inputs.samples, store, cfg.batch_size,
                            cfg.num_workers, scorer.device, lambda i, why: _failed(inputs, i, why), indices=mine)
        everywhere = distributed.all_gather_object((np.flatnonzero(read), inputs.failures))
        inputs.failures = {i: why for _, failures in everywhere for i, why in failures.items()}
        if not sum(len(found) for found, _ in everywhere):
            raise UserError(f"--images: none of the {n} images could be read (first: {inputs.failures[0]})")
        merge = distributed.all_reduce if ranks.active else None
        statistics = set_statistics(lambda: store.chunks(np.flatnonzero(read), cfg.batch_size), inputs.kind,
                                    scorer.extractor.image_size, merge, len(scorer.extractor.channels))
        threshold = _set_threshold(inputs, statistics)
        scored = time.perf_counter()
        value_range, scores = set_scores(inputs, store, read, statistics)
        record = prediction_record(inputs, {}, threshold, {"inputs": [os.path.abspath(p) for p in cfg.images], "count": n},
                         {})
        if ranks.primary:
            record["images"].update(write_set_scores(inputs, scores, threshold["value"]))
        record["seconds"] = {"scoring": scored - started, "scores": time.perf_counter() - scored}
        save_record(inputs, record)
        if cfg.heatmaps:
            drawn = time.perf_counter()
            draw_set_heatmaps(inputs, store, read, statistics, threshold["value"], value_range, mine)
            record["seconds"]["heatmaps"] = time.perf_counter() - drawn
    record["seconds"]["total"] = total = time.perf_counter() - started
    record["images_per_second"] = n / total
    save_record(inputs, record)
    return record


def _failed(inputs: "PredictionInputs", index: int, why: str) -> None:
    inputs.failures[index] = why
    tqdm.write(f"warning: {why}; its row in scores.csv is marked failed", file=sys.stderr)


def _set_threshold(inputs: "PredictionInputs", statistics) -> dict:
    """The image threshold: ``--threshold``, or from the references' scores (each against the other k-1)
    under the set's statistics (§11.2)."""
    cfg, scorer = inputs.config, inputs.scorer
    if cfg.threshold is not None:
        print(f"threshold {cfg.threshold:.6g} (--threshold)")
        return {"value": float(cfg.threshold), "from": "--threshold"}
    levels = nearest_levels([inputs.kind], len(scorer.extractor.channels))
    outputs = reference_outputs(scorer.model, scorer.bank, scorer.extractor.feature_sizes, levels)
    maps = resad_maps(outputs, inputs.kind, scorer.extractor.image_size, cfg.smooth_sigma, statistics)
    scores = image_scores(maps, cfg.image_score).numpy().astype(np.float64)
    value = float(scores.max() if cfg.threshold_quantile is None else np.quantile(scores, cfg.threshold_quantile))
    rule = "max" if cfg.threshold_quantile is None else f"quantile {cfg.threshold_quantile:g}"
    print(f"threshold {value:.6g}: the {rule} of the {len(scores)} references' leave-one-out scores (each against "
          f"the other {len(scores) - 1}: " + ", ".join(f"{s:.4g}" for s in scores) + ")")
    return {"value": value, "from": "references", "rule": rule, "reference_scores": scores.tolist()}


def set_scores(inputs: "PredictionInputs", store: OutputStore, read: np.ndarray,
               statistics) -> Tuple[Tuple[float, float], Dict[int, float]]:
    """Pass 2: the image score of every image this rank read (the raw maps saved), and the maps' (min, max),
    both over every rank."""
    cfg, size = inputs.config, inputs.scorer.extractor.image_size
    low, high, scores = np.inf, -np.inf, {}
    mine = np.flatnonzero(read)
    for start in tqdm(range(0, len(mine), cfg.batch_size), desc="scores", dynamic_ncols=True):
        chunk = mine[start:start + cfg.batch_size]
        maps = resad_maps(store.get(chunk), inputs.kind, size, cfg.smooth_sigma, statistics)
        scores.update(zip(chunk.tolist(), image_scores(maps, cfg.image_score).tolist()))
        for j, index in enumerate(chunk.tolist()):
            low, high = min(low, float(maps[j].min())), max(high, float(maps[j].max()))
            if cfg.save_maps:
                save_map(inputs.outputs.raw_map(inputs.names[index]), maps[j])
    everyone = distributed.all_gather_object((low, high, scores))
    value_range = (min(part[0] for part in everyone), max(part[1] for part in everyone))
    return value_range, {i: v for part in everyone for i, v in part[2].items()}


def write_set_scores(inputs: "PredictionInputs", scores: Dict[int, float], threshold: float) -> dict:
    """``scores.csv`` of every image in input order (written whole); returns the count of each label."""
    with ScoresWriter.open(inputs.outputs.scores_csv()) as writer:
        for index, sample in enumerate(inputs.samples):
            if index in scores:
                writer.scored(sample.image, scores[index], threshold)
            else:
                writer.failed(sample.image, threshold, inputs.failures[index])
    return dict(writer.counts)


def draw_set_heatmaps(inputs: "PredictionInputs", store: OutputStore, read: np.ndarray, statistics, threshold: float,
                      value_range: Tuple[float, float], indices: np.ndarray) -> None:
    """Pass 3: one PNG per readable image of ``indices`` (this rank's), the images read again and the maps
    built again (cheap next to drawing)."""
    cfg, extractor = inputs.config, inputs.scorer.extractor
    canvas = PredictionHeatmaps(value_range, threshold, size=extractor.image_size)
    try:
        for start, batch in image_batches([inputs.samples[i] for i in indices], extractor, cfg.batch_size,
                                          cfg.num_workers, "heat-maps"):
            chunk = indices[start:start + len(batch["path"])]
            good = chunk[read[chunk]]
            if not len(good):
                continue
            maps = resad_maps(store.get(good), inputs.kind, extractor.image_size, cfg.smooth_sigma, statistics)
            scores = image_scores(maps, cfg.image_score).tolist()
            positions = {index: j for j, index in enumerate(chunk.tolist())}
            for j, index in enumerate(good.tolist()):
                canvas.save(inputs.outputs.heatmap(inputs.names[index]),
                            input_image(batch["image"][positions[index]], extractor), maps[j].numpy(),
                            heatmap_title(inputs.names[index], scores[j], threshold))
    finally:
        canvas.close()
