"""The checks-first preparation shared by the three runs (train, evaluate a checkpoint, kNN baseline).

Every input is checked before any time is spent: the setting and its dataset
roots, the output folders, the checkpoint to evaluate (and whether it fits the
setting), the training data, the reference features and the backbone's weights
file, in that order; then the backbone is built and the reference banks are
read (each once) and checked against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from datasets import Sample, Setting, evaluation_samples, training_samples
from datasets.anomaly_source import choose_anomaly_source
from datasets.base import has_pixel_labels
from datasets.resize import crop_losses
from models.extractor import BackboneConfig, FeatureExtractor, set_amp, set_resize
from models.matching import ReferenceBank
from utils import distributed
from utils.atomic import check_writable
from utils.errors import UserError
from utils.formats import checkpoint, reference_features
from utils.formats.calibration import bank_fingerprint
from utils.formats.run_outputs import RunOutputs
from utils.report.history import check_tensorboard
from utils.report.run_record import git_state
from utils.run.config import RunConfig
from utils.runtime import configure_device, resolve_device
from utils.seed import seed_everything

TRAIN, EVALUATE, KNN = "train", "evaluate", "knn"


@dataclass
class TrainingData:
    """The training images of the seen classes: stage 1 (normal), stage 2 (with anomalies), normals per class."""
    stage_samples: Dict[int, List[Sample]]
    anomaly_source: str
    normals: Dict[str, List[Sample]]


@dataclass
class RunInputs:
    """Everything a run needs, checked."""
    config: RunConfig
    device: torch.device
    setting: Setting
    outputs: Dict[int, RunOutputs]
    test_sets: Dict[str, List[Sample]]
    extractor: FeatureExtractor
    banks: Dict[str, ReferenceBank]
    training: Optional[TrainingData] = None
    checkpoint: Optional[dict] = None        # EVALUATE: the checkpoint's state


def prepare(config: RunConfig, mode: str, extractor: Optional[FeatureExtractor] = None,
            checkpoint_path: Optional[str] = None) -> RunInputs:
    """Check the inputs of a ``mode`` run (:data:`TRAIN`, :data:`EVALUATE` with ``checkpoint_path``, or
    :data:`KNN`), then build the backbone (unless ``extractor`` is given) and read the reference banks."""
    ranks = distributed.init(config.device)
    device = resolve_device(distributed.device_of(ranks, config.device))
    configure_device(device)
    seed_everything(config.seed)
    data = config.data
    setting = data.setting.resolve(data.train_dataset_dir, data.test_dataset_dir)
    state = _checkpoint_to_evaluate(checkpoint_path, setting, config.backbone.resize) if mode == EVALUATE else None
    outputs = {k: RunOutputs(check_writable(os.path.join(config.checkpoint_path, name)), name)
               for k, name in config.run_names.items()}
    test_sets = {c: evaluation_samples(setting.target, data.test_dataset_dir, c) for c in setting.unseen_classes}
    training = _training_data(config, setting) if mode == TRAIN else None
    backbone = _backbone(config, state)
    if extractor is None:
        backbone.check_paths()
    reference_features.check_dirs(data.test_ref_feature_dir, setting.unseen_classes)
    whose = f"--checkpoint {checkpoint_path} holds a model trained with --backbone {backbone.name}" if state else ""
    for class_name in setting.unseen_classes:
        meta = reference_features.read_meta(data.test_ref_feature_dir, class_name)
        reference_features.check_backbone(data.test_ref_feature_dir, class_name, meta,
                                          {"backbone": backbone.name, "resize": backbone.resize}, whose)
    if extractor is None:
        extractor = backbone.build(device)
    set_resize(set_amp(extractor, config.backbone.amp), config.backbone.resize)
    report_test_sets(test_sets, extractor.resize, extractor.image_size)
    if state is not None:
        checkpoint.check_extractor(state, checkpoint_path, extractor)
    evaluation = config.evaluation
    banks = reference_features.load_banks(data.test_ref_feature_dir, setting.unseen_classes, extractor.describe(),
                                          evaluation.shots, evaluation.ref_groups > 1, device, evaluation.shots_flag)
    if distributed.current().active:
        distributed.check_same(_identity(config, test_sets, training, banks), "the run")
    return RunInputs(config, device, setting, outputs, test_sets, extractor, banks, training, state)


def _identity(config: RunConfig, test_sets, training: Optional[TrainingData], banks) -> dict:
    """What every rank of a torchrun job must agree on: the arguments, the code version, the data."""
    return {"arguments": config.arguments, "code version": git_state().get("commit"),
            "test images": {c: [s.image for s in samples] for c, samples in test_sets.items()},
            "training images": {k: [s.image for s in v] for k, v in training.stage_samples.items()} if training else None,
            "reference features": {c: bank_fingerprint(b) for c, b in banks.items()}}


def _checkpoint_to_evaluate(path: Optional[str], setting: Setting, resize: str) -> dict:
    if not path:
        raise UserError("--eval_only: give the trained model with --checkpoint FILE (a *_latest.pth or *_best.pth)")
    state = checkpoint.open_model(path)
    checkpoint.check_target(state, path, setting)
    checkpoint.check_resize(state, path, resize)
    return state


def report_test_sets(test_sets: Dict[str, List[Sample]], resize: str, size: int) -> None:
    """Print a line per class evaluated on image labels only (no masks, docs/method.md §5.5), and per class
    whose annotated defects the center crop (``resize`` "crop") cuts into (§2.1, :func:`datasets.resize.crop_losses`)."""
    for class_name, samples in test_sets.items():
        if not has_pixel_labels(samples):
            print(f"{class_name}: its anomalous test images have no pixel masks, so it is evaluated on image "
                  "metrics only (pixel metrics left empty, heat-maps without an outline)")
        elif resize == "crop":
            message = crop_losses(samples, size, class_name).message()
            if message:
                print(f"warning: {message}")


def _backbone(config: RunConfig, state: Optional[dict]) -> BackboneConfig:
    """The run's backbone; for a checkpoint, the checkpoint's backbone and levels with the run's weights file."""
    if state is None:
        return config.backbone
    return checkpoint.backbone_config(state, config.backbone.weights, config.backbone.amp, config.backbone.resize)


def _training_data(config: RunConfig, setting: Setting) -> TrainingData:
    """The stage-1 and stage-2 samples of the seen classes, checked against the batch and reference sizes."""
    train, root = config.training, config.data.train_dataset_dir
    stage_samples = {1: training_samples(setting.source, root, setting.seen_classes, stage=1)}
    source, stage_samples[2] = choose_anomaly_source(train.anomaly_source, setting, root)
    check_tensorboard(train.tensorboard)
    normals: Dict[str, List[Sample]] = {}
    for s in stage_samples[1]:
        if not s.label:
            normals.setdefault(s.class_name, []).append(s)
    fewest = min(normals.items(), key=lambda kv: len(kv[1]))
    needed = train.train_ref_shot + int(train.train_exclude_self)  # the image itself is left out of its references
    if needed > min(len(fewest[1]), train.train_ref_pool):
        raise UserError(f"--train_ref_shot {train.train_ref_shot}: class '{fewest[0]}' has "
                        f"{len(fewest[1])} normal training images and the pool holds {train.train_ref_pool}; "
                        f"{'with --train_exclude_self ' if train.train_exclude_self else ''}each needs at least "
                        f"{needed}: lower --train_ref_shot")
    if train.batch_size > len(stage_samples[1]):
        raise UserError(f"--batch_size {train.batch_size}: larger than the {len(stage_samples[1])} normal training "
                        "images of the seen classes; lower --batch_size")
    return TrainingData(stage_samples, source, normals)
