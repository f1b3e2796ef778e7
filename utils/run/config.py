"""Typed configuration of a run, built once from the command line (:mod:`utils.cli.adapters`).

A :class:`RunConfig` gathers what the data are (:class:`DataConfig`), which
backbone (:class:`models.extractor.BackboneConfig`), which model
(:class:`models.resad.ModelConfig`), how to train (:class:`TrainConfig`) and how to
evaluate (:class:`EvalConfig`).  The defaults are the authors'.  Nothing in the
library reads the command line's Namespace; ``arguments`` keeps it as plain values
for the run record and the checkpoints only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from datasets import SettingSpec
from datasets.anomaly_source import ANOMALY_SOURCES
from datasets.defects import DEFECT_FAMILIES
from models.extractor import BackboneConfig
from models.calibration import NORMALIZATIONS
from models.resad import ModelConfig


@dataclass(frozen=True)
class DataConfig:
    """The setting and where its data are."""
    setting: SettingSpec = SettingSpec("visa_to_mvtec")
    train_dataset_dir: str = ""           # root of the SOURCE (seen) dataset
    test_dataset_dir: str = ""            # root of the TARGET (unseen) dataset
    test_ref_feature_dir: str = "./ref_features/w50/mvtec_4shot"


@dataclass(frozen=True)
class TrainConfig:
    """Training (docs/method.md §3, §4)."""
    epochs: int = 100
    stage1_epochs: int = 10               # first epochs on normal images only
    lr: float = 1e-5
    batch_size: int = 32
    train_ref_shot: int = 4               # references per seen class in a batch
    train_ref_pool: int = 16              # normal images per seen class encoded each epoch
    train_exclude_self: bool = False      # a training image is never among its own references
    eval_freq: int = 1                    # evaluate every N epochs (and after the last)
    best_metric: str = "Image AUC"        # selects <run>_best.pth
    max_bad_steps: int = 50               # stop after this many consecutive non-finite steps
    pos_beta: float = 0.05                # BG-SPP: quantile of the normal boundary
    margin_tau: float = 0.1               # BG-SPP: margin between the boundaries
    bgspp_lambda: float = 1.0
    anomaly_source: Optional[str] = None  # real, synthetic or mixed; None: real when the source has them
    synthetic_fraction: float = 0.5
    synthetic_defects: Tuple[str, ...] = tuple(DEFECT_FAMILIES)
    resume: Optional[str] = None          # a checkpoint path, or "auto" for the run's own latest one
    tensorboard: Optional[str] = None     # a folder for TensorBoard logs

    def __post_init__(self):
        if self.anomaly_source not in (None,) + ANOMALY_SOURCES:
            raise ValueError(f"anomaly_source must be one of {ANOMALY_SOURCES}, got {self.anomaly_source!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of the unseen classes (docs/method.md §2.8, §5, §7)."""
    shots: Tuple[int, ...] = (4,)         # numbers of reference shots evaluated
    shots_flag: str = "--num_ref_shot"    # how the command line names them, for messages
    ref_groups: int = 1                   # seeded draws of the references per k
    fdm_alpha: float = 0.4                # EFDM strength (1 = no matching)
    smooth_sigma: float = 4.0             # Gaussian smoothing of the maps
    batch_size: int = 32
    aupro: bool = True
    num_heatmaps: int = 4                 # failure heat-maps per class after the last evaluation
    anomaly_map: str = "authors"          # the map a run scores with (models.anomaly_map.ANOMALY_MAP_RECIPES)
    image_score: str = "max"              # image score from the map (models.anomaly_map.IMAGE_SCORES)
    map_metrics: bool = True              # also the metrics of each single map (<run>_epoch<E>_maps.csv)
    normalization: str = "set"            # the maps' statistics: the scored set's or the references' (NORMALIZATIONS)

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``run_names`` maps each k of ``evaluation.shots`` to its output name."""
    run_names: Mapping[int, str]
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    model: ModelConfig = ModelConfig()
    training: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig()
    checkpoint_path: str = "./checkpoints/"
    device: str = "auto"
    seed: int = 42
    num_workers: int = 0
    arguments: Dict[str, object] = field(default_factory=dict)

    @property
    def shots(self) -> Tuple[int, ...]:
        return self.evaluation.shots


@dataclass(frozen=True)
class PredictConfig:
    """``predict.py``: score new images of one class with a trained checkpoint and k normal references
    (docs/method.md §11).  Exactly one of ``ref_images`` and ``ref_features`` is given."""
    checkpoint: str
    images: Tuple[str, ...]               # folders (searched recursively) and image files
    out: str                              # the output folder (utils.formats.predictions.PredictionOutputs)
    ref_images: Optional[str] = None      # a folder of k normal images, encoded on the fly
    ref_features: Optional[str] = None    # a class folder written by extract_ref_features.py
    num_ref_shot: Optional[int] = None    # the first k references (default: all)
    threshold: Optional[float] = None     # a fixed image threshold; None: from the references
    threshold_quantile: Optional[float] = None  # of the leave-one-out reference scores; None: their max
    heatmaps: bool = True                 # one PNG per image
    save_maps: bool = False               # one float16 .npy map per image
    anomaly_map: str = "authors"          # models.anomaly_map.ANOMALY_MAP_RECIPES
    image_score: str = "max"              # models.anomaly_map.IMAGE_SCORES
    normalization: str = "references"     # the maps' statistics: the references' (one image at a time) or the set's
    fdm_alpha: float = 0.4
    smooth_sigma: float = 4.0
    batch_size: int = 32
    backbone_weights: Optional[str] = None  # a local weights file for the checkpoint's backbone
    amp: str = "none"
    device: str = "auto"
    num_workers: int = 0
    seed: int = 42
    arguments: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if (self.ref_images is None) == (self.ref_features is None):
            raise ValueError("give exactly one of ref_images and ref_features")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
