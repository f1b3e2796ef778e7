"""``predict.py``: anomaly scores, labels and maps of new images of one class, from a trained checkpoint
and k normal references, without labels (docs/method.md §11).

:func:`prepare_prediction` checks every input before time is spent (checkpoint, images, references,
output folder, backbone weights), then builds the backbone, reads or encodes the references and
loads the model.  :func:`predict` runs the passes of :mod:`utils.run.prediction`: score every image
into a scratch store, the set's statistics, the references' threshold, then ``scores.csv`` (and the
raw maps), then the heat-maps; every output file is written under a temporary name and renamed.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets import Sample
from datasets.files import list_subfolders, walk_image_files
from models.anomaly_map import ANOMALY_MAP_RECIPES, image_scores, needs_nearest
from models.extractor import FeatureExtractor, set_amp, set_resize
from models.matching import ReferenceBank
from models.resad import ResAD
from utils.atomic import atomic_path, check_writable, ensure_dir, save_json
from utils.errors import UserError
from utils.formats import checkpoint, reference_features
from utils.formats.predictions import PredictionOutputs, ScoresWriter, judge, output_names
from utils.report import run_record
from utils.report.plots import PredictionHeatmaps
from utils.run.config import PredictConfig
from utils.run.loaders import make_loader
from utils.run.prediction import (OutputStore, build_maps, image_batches, input_image, leave_one_out_outputs,
                                  needed_fields, reference_threshold, score_images, set_statistics)
from utils.runtime import configure_device, resolve_device
from utils.seed import seed_everything

CLASS = "predict"  # the class name of every Sample: one class per run


@dataclass
class PredictionInputs:
    """Everything a prediction run needs, checked."""
    config: PredictConfig
    device: torch.device
    state: dict                          # the checkpoint
    extractor: FeatureExtractor
    model: ResAD
    bank: ReferenceBank
    references: dict                     # what the references are, for the run record
    samples: List[Sample]
    names: List[str]                     # per image its output name (utils.formats.predictions)
    outputs: PredictionOutputs
    failures: Dict[int, str] = field(default_factory=dict)  # image index -> why it could not be read

    @property
    def kind(self) -> str:
        return ANOMALY_MAP_RECIPES[self.config.anomaly_map]


def list_images(paths: Tuple[str, ...], out: str, flag: str = "--images") -> List[Tuple[str, str]]:
    """(image, the folder it was found in or "" for a file given by itself) of every folder (searched
    recursively, the output folder ``out`` left out) and file of ``paths``; UserError for a missing path
    or no image at all."""
    found, outputs = [], os.path.join(os.path.abspath(out), "")
    for path in paths:
        if os.path.isdir(path):
            images = [p for p in walk_image_files(path) if not os.path.abspath(p).startswith(outputs)]
            if not images:
                raise UserError(f"{flag} {path}: the folder holds no images (.png/.jpg/.jpeg/.bmp/.tif, searched "
                                "recursively); give a folder of images or image files")
            found += [(image, path) for image in images]
        elif os.path.isfile(path):
            found.append((path, ""))
        else:
            raise UserError(f"{flag} {path}: no such file or folder; check the path")
    if not found:
        raise UserError(f"{flag}: no images given; give a folder of images or image files")
    unique = {}
    for image, root in found:  # an image given twice (a file and its folder, nested folders) is scored once
        unique.setdefault(os.path.abspath(image), (image, root))
    return list(unique.values())


def reference_images(folder: str, shots: Optional[int]) -> List[str]:
    """The first ``shots`` (default all) images under ``folder`` (sorted, recursive)."""
    if not os.path.isdir(folder):
        raise UserError(f"--ref_images {folder}: folder not found; give a folder of k normal images of the class")
    images = walk_image_files(folder)
    if not images:
        raise UserError(f"--ref_images {folder}: the folder holds no images (.png/.jpg/.jpeg/.bmp/.tif); "
                        "give a folder of k normal images of the class")
    if shots is not None and shots > len(images):
        raise UserError(f"--num_ref_shot {shots}: {folder} holds only {len(images)} images; ask for fewer")
    return images[:shots]


def reference_folder(path: str) -> Tuple[str, str]:
    """(reference-feature folder, class) of ``--ref_features``: a class folder of extract_ref_features.py,
    or its save folder when that holds one class only."""
    flag = "--ref_features"
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: folder not found; give a class folder written by extract_ref_features.py "
                        "(<save_dir>/<class>)")
    full = os.path.abspath(path)
    if os.path.isfile(os.path.join(full, "layer1.npy")):
        return os.path.dirname(full), os.path.basename(full)
    classes = [c for c in list_subfolders(full) if os.path.isfile(os.path.join(full, c, "layer1.npy"))]
    if len(classes) == 1:
        return full, classes[0]
    if not classes:
        raise UserError(f"{flag} {path}: no reference features here (no layer1.npy); write them with "
                        "extract_ref_features.py, or give normal images with --ref_images")
    raise UserError(f"{flag} {path}: holds the features of {len(classes)} classes ({', '.join(classes)}); give "
                    f"one class folder, e.g. {os.path.join(path, classes[0])}")


def prepare_prediction(config: PredictConfig, extractor: Optional[FeatureExtractor] = None) -> PredictionInputs:
    """Check every input, then build the backbone (unless ``extractor`` is given), the references and the model."""
    device = resolve_device(config.device)
    configure_device(device)
    seed_everything(config.seed)
    state = checkpoint.open_model(config.checkpoint)
    found = list_images(config.images, config.out)
    ref_files = reference_images(config.ref_images, config.num_ref_shot) if config.ref_images else None
    ref_dir, ref_class = reference_folder(config.ref_features) if config.ref_features else (None, None)
    check_writable(config.out, "--out")
    backbone = checkpoint.backbone_config(state, config.backbone_weights, config.amp)
    if extractor is None:
        backbone.check_paths()
    if ref_dir is not None:  # cheap: a wrong backbone costs no backbone build
        meta = reference_features.read_meta(ref_dir, ref_class, "--ref_features")
        whose = f"--checkpoint {config.checkpoint} holds a model trained with --backbone {backbone.name}"
        reference_features.check_backbone(ref_dir, ref_class, meta, {"backbone": backbone.name,
                                                                     "resize": backbone.resize}, whose,
                                          flag="--ref_features")
    extractor = set_resize(set_amp(extractor or backbone.build(device), config.amp), backbone.resize)
    checkpoint.check_extractor(state, config.checkpoint, extractor)
    bank, references = _references(config, extractor, ref_files, ref_dir, ref_class, device)
    references["shots"] = bank.num_shots
    if bank.num_shots < 2 and config.threshold is None:
        raise UserError(f"{references['source']}: one reference image cannot score itself against the others; "
                        "give at least two references, or a fixed image threshold with --threshold X")
    model = checkpoint.build_model(state, extractor, config.fdm_alpha, device)
    samples = [Sample(path, 0, (), CLASS) for path, _ in found]
    return PredictionInputs(config, device, state, extractor, model, bank, references, samples, output_names(found),
                            PredictionOutputs(config.out))


def _references(config: PredictConfig, extractor: FeatureExtractor, ref_files: Optional[List[str]],
                ref_dir: Optional[str], ref_class: Optional[str], device: torch.device) -> Tuple[ReferenceBank, dict]:
    """The bank of ``--ref_images`` (encoded now) or ``--ref_features`` (read and checked), and its record."""
    if ref_files is not None:
        bank = encode_references(ref_files, extractor, config.batch_size, device)
        return bank, {"source": "--ref_images", "dir": os.path.abspath(config.ref_images),
                      "images": [os.path.abspath(p) for p in ref_files]}
    bank = reference_features.load_bank(ref_dir, ref_class, extractor.describe(), config.num_ref_shot,
                                        flag="--ref_features").to(device)
    return bank, {"source": "--ref_features", "dir": os.path.join(ref_dir, ref_class),
                  "meta": reference_features.read_meta(ref_dir, ref_class, "--ref_features")}


@torch.inference_mode()
def encode_references(files: List[str], extractor: FeatureExtractor, batch_size: int,
                      device: torch.device) -> ReferenceBank:
    """The bank of the reference images ``files``, encoded as extract_ref_features.py does."""
    levels: List[List[torch.Tensor]] = [[] for _ in extractor.channels]
    for batch in make_loader([Sample(path, 0, (), CLASS) for path in files], extractor, batch_size, 0):
        for level, features in enumerate(extractor(batch["image"].to(device))):
            levels[level].append(features)
    return ReferenceBank.from_features([torch.cat(level) for level in levels])


def predict(config: PredictConfig, extractor: Optional[FeatureExtractor] = None) -> dict:
    """Score, label and map the images of ``config``; returns the run record."""
    inputs = prepare_prediction(config, extractor)
    cfg, started, n = inputs.config, time.perf_counter(), len(inputs.samples)
    print(f"predict: {n} images, {inputs.bank.num_shots} references ({inputs.references['source']}), backbone "
          f"{inputs.extractor.name} (--resize {inputs.extractor.resize}, the checkpoint's), map {cfg.anomaly_map}, "
          f"image score {cfg.image_score}, device {inputs.device}")
    created = not os.path.isdir(cfg.out)
    ensure_dir(cfg.out, "--out")
    try:
        with inputs.outputs.scratch() as scratch, OutputStore(scratch, n, inputs.extractor.feature_sizes,
                                                              needed_fields(inputs.kind)) as store:
            record = _passes(inputs, store, started)
    except BaseException:
        if created and not os.listdir(cfg.out):  # a run that wrote nothing leaves no empty folder either
            os.rmdir(cfg.out)
        raise
    record["seconds"]["total"] = total = time.perf_counter() - started
    record["images_per_second"] = n / total
    save_json(inputs.outputs.run_record(), record)
    counts = record["images"]
    print(f"predict: {counts.get('anomalous', 0)} anomalous, {counts.get('normal', 0)} normal, "
          f"{counts.get('failed', 0)} failed of {n} images ({total:.1f} s, {n / total:.2f} images/s); results in "
          f"{cfg.out}: scores.csv, predict_run.json" + (", heatmaps/" if cfg.heatmaps else "")
          + (", maps/" if cfg.save_maps else ""))
    return record


def _passes(inputs: PredictionInputs, store: OutputStore, started: float) -> dict:
    """Score every image into ``store``, the set's statistics and the threshold, then ``scores.csv`` (the
    run record written beside it), then the heat-maps; returns the run record."""
    cfg = inputs.config
    read = score_images(inputs.model, inputs.extractor, inputs.bank, inputs.samples, store, cfg.batch_size,
                        cfg.num_workers, inputs.device, lambda i, why: _failed(inputs, i, why))
    if not read.any():
        raise UserError(f"--images: none of the {len(inputs.samples)} images could be read (first: "
                        f"{inputs.failures[0]})")
    statistics = set_statistics(lambda: store.chunks(np.flatnonzero(read), cfg.batch_size), inputs.kind,
                                inputs.extractor.image_size)
    threshold = _threshold(inputs, statistics)
    scored = time.perf_counter()
    value_range, counts = write_scores(inputs, store, read, statistics, threshold["value"])
    record = _record(inputs, threshold, value_range, counts,
                     {"scoring": scored - started, "scores": time.perf_counter() - scored})
    save_json(inputs.outputs.run_record(), record)
    if cfg.heatmaps:
        drawn = time.perf_counter()
        draw_heatmaps(inputs, store, read, statistics, threshold["value"], value_range)
        record["seconds"]["heatmaps"] = time.perf_counter() - drawn
    return record


def _failed(inputs: PredictionInputs, index: int, why: str) -> None:
    inputs.failures[index] = why
    tqdm.write(f"warning: {why}; its row in scores.csv is marked failed", file=sys.stderr)


def _threshold(inputs: PredictionInputs, statistics) -> dict:
    """The image threshold: ``--threshold``, or from the references' leave-one-out scores (§11)."""
    cfg = inputs.config
    if cfg.threshold is not None:
        print(f"threshold {cfg.threshold:.6g} (--threshold)")
        return {"value": float(cfg.threshold), "from": "--threshold"}
    flag = "--ref_images" if cfg.ref_images else "--ref_features"
    outputs = leave_one_out_outputs(inputs.model, inputs.bank, inputs.extractor.feature_sizes, flag,
                                    nearest=needs_nearest(inputs.kind))
    maps = build_maps(outputs, inputs.kind, statistics, inputs.extractor.image_size, cfg.smooth_sigma)
    scores = image_scores(maps, cfg.image_score).numpy().astype(np.float64)
    value = reference_threshold(scores, cfg.threshold_quantile)
    rule = "max" if cfg.threshold_quantile is None else f"quantile {cfg.threshold_quantile:g}"
    print(f"threshold {value:.6g}: the {rule} of the {len(scores)} references' leave-one-out scores (each against "
          f"the other {len(scores) - 1}: " + ", ".join(f"{s:.4g}" for s in scores) + ")")
    return {"value": value, "from": "references", "rule": rule, "reference_scores": scores.tolist()}


def write_scores(inputs: PredictionInputs, store: OutputStore, read: np.ndarray, statistics,
                 threshold: float) -> Tuple[Tuple[float, float], dict]:
    """Pass 2: ``scores.csv`` (and the raw maps); returns the maps' (min, max) and the count of each label."""
    cfg, size, n = inputs.config, inputs.extractor.image_size, len(inputs.samples)
    low, high = np.inf, -np.inf
    with ScoresWriter.open(inputs.outputs.scores_csv()) as writer:
        for start in tqdm(range(0, n, cfg.batch_size), desc="scores", dynamic_ncols=True):
            chunk = np.arange(start, min(n, start + cfg.batch_size))
            good = chunk[read[chunk]]
            maps = build_maps(store.get(good), inputs.kind, statistics, size, cfg.smooth_sigma) if len(good) else None
            scores = dict(zip(good.tolist(), image_scores(maps, cfg.image_score).tolist())) if len(good) else {}
            for j, index in enumerate(good.tolist()):
                low, high = min(low, float(maps[j].min())), max(high, float(maps[j].max()))
                if cfg.save_maps:
                    _save_map(inputs.outputs.raw_map(inputs.names[index]), maps[j])
            for index in chunk.tolist():
                path = inputs.samples[index].image
                if index in scores:
                    writer.scored(path, scores[index], threshold)
                else:
                    writer.failed(path, threshold, inputs.failures[index])
    return (low, high), dict(writer.counts)


def _save_map(path: str, values: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, values.numpy().astype(np.float16))


def draw_heatmaps(inputs: PredictionInputs, store: OutputStore, read: np.ndarray, statistics, threshold: float,
                  value_range: Tuple[float, float]) -> None:
    """Pass 3: one PNG per readable image, the images read again and the maps built again (cheap next to drawing)."""
    cfg, extractor = inputs.config, inputs.extractor
    canvas = PredictionHeatmaps(value_range, threshold, size=extractor.image_size)
    try:
        for start, batch in image_batches(inputs.samples, extractor, cfg.batch_size, cfg.num_workers, "heat-maps"):
            chunk = np.arange(start, start + len(batch["path"]))
            good = chunk[read[chunk]]
            if not len(good):
                continue
            maps = build_maps(store.get(good), inputs.kind, statistics, extractor.image_size, cfg.smooth_sigma)
            scores = image_scores(maps, cfg.image_score).tolist()
            for j, index in enumerate(good.tolist()):
                title = (f"{inputs.names[index]}: image score {scores[j]:.4g} "
                         f"{'>' if scores[j] > threshold else '<='} threshold {threshold:.4g}: "
                         f"{judge(scores[j], threshold)}")
                canvas.save(inputs.outputs.heatmap(inputs.names[index]),
                            input_image(batch["image"][index - start], extractor), maps[j].numpy(), title)
    finally:
        canvas.close()

def _record(inputs: PredictionInputs, threshold: dict, value_range, counts: dict, seconds: dict) -> dict:
    cfg, state = inputs.config, inputs.state
    return run_record.prediction_record(
        cfg.arguments, cfg.seed, inputs.device,
        checkpoint={"path": os.path.abspath(cfg.checkpoint), "epoch": int(state.get("epoch", 0)),
                    "trained_on": state["trained_on"], "model_config": state.get("model_config")},
        references=inputs.references,
        images={"inputs": [os.path.abspath(p) for p in cfg.images], "count": len(inputs.samples), **counts},
        maps={"anomaly_map": cfg.anomaly_map, "kind": inputs.kind, "image_score": cfg.image_score,
              "smooth_sigma": cfg.smooth_sigma, "fdm_alpha": cfg.fdm_alpha, "resize": inputs.extractor.resize,
              "value_range": list(value_range)},
        threshold=threshold, seconds=seconds)
