"""A trained model with one class's references and calibration, loaded once, that scores images one at a
time (docs/method.md §11): the core of ``predict.py`` and an importable API.

    from utils.run.predictor import Inferencer

    inferencer = Inferencer("checkpoints/demo/demo_latest.pth", ref_images="data/demo/weave/train/good",
                            preset="recommended")
    result = inferencer.predict("data/demo/weave/test/hole/000.png")   # a path, a PIL image or a tensor
    print(result.score, result.label, result.threshold, result.map.shape)

:func:`load_scorer` checks the checkpoint and the references, builds the backbone and the model, and
reads the class's calibration (:mod:`utils.formats.calibration`) or computes and writes it; a
:class:`Scorer` then turns pre-processed image batches into image scores and maps, each image on its own.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image

from datasets import AnomalyDataset, Sample
from datasets.files import list_subfolders, walk_image_files
from datasets.image_io import read_image, to_rgb
from models.anomaly_map import ANOMALY_MAP_RECIPES, image_scores, nearest_levels, resad_maps
from models.calibration import Calibration, calibrate_model
from models.extractor import FeatureExtractor, set_amp, set_resize
from models.matching import ReferenceBank
from models.resad import ResAD
from utils import distributed
from utils.cli.presets import PRESETS
from utils.distributed import Ranks
from utils.errors import UserError
from utils.formats import calibration as calibration_file
from utils.formats import checkpoint, reference_features
from utils.formats.predictions import judge
from utils.run.config import PredictConfig
from utils.run.loaders import make_loader
from utils.runtime import configure_device, resolve_device

CLASS = "predict"  # the class name of every Sample: one class per run


@dataclass
class Scorer:
    """One class's model, references and calibration.  :meth:`score` depends on nothing but the images."""
    config: PredictConfig
    device: torch.device
    state: dict                      # the checkpoint
    extractor: FeatureExtractor
    model: ResAD
    bank: ReferenceBank
    references: dict                 # what the references are, for the run record
    calibration: Optional[Calibration]   # the class's (None under the set's statistics: predict.py's passes)
    calibration_record: dict             # where the calibration came from, for the run record
    ranks: Ranks = Ranks()               # this process's place in a torchrun job

    @property
    def kind(self) -> str:
        return ANOMALY_MAP_RECIPES[self.config.anomaly_map]

    @property
    def threshold(self) -> float:
        """``--threshold``, or from the references' scores (their maximum or ``--threshold_quantile``)."""
        if self.config.threshold is not None:
            return float(self.config.threshold)
        return self.calibration.threshold(self.kind, self.config.image_score, self.config.threshold_quantile)

    def value_range(self) -> Tuple[float, float]:
        """A colour scale that depends on the calibration only: from the references' lowest map value to as
        far above the threshold as that is below it."""
        low = min(self.calibration.reference_range[self.kind][0], self.threshold)
        return low, self.threshold + max(self.threshold - low, 1e-6)

    @torch.inference_mode()
    def score(self, images: torch.Tensor) -> Tuple[np.ndarray, torch.Tensor]:
        """(B,) image scores and (B, S, S) maps of a batch of pre-processed (B, 3, S, S) images, normalised
        with the class's calibration."""
        k = self.bank.num_shots
        features = self.extractor(images.to(self.device, non_blocking=True))
        levels = nearest_levels([self.kind], len(features))
        outputs = self.model.forward_shots(features, self.bank, [k], nearest_levels=levels)[k]
        maps = resad_maps(outputs, self.kind, size=self.extractor.image_size, sigma=self.config.smooth_sigma,
                          statistics=self.calibration.statistics[self.kind])
        return image_scores(maps, self.config.image_score).double().numpy(), maps


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


@torch.inference_mode()
def encode_references(files: List[str], extractor: FeatureExtractor, batch_size: int,
                      device: torch.device) -> ReferenceBank:
    """The bank of the reference images ``files``, encoded as extract_ref_features.py does."""
    levels: List[List[torch.Tensor]] = [[] for _ in extractor.channels]
    for batch in make_loader([Sample(path, 0, (), CLASS) for path in files], extractor, batch_size, 0):
        for level, features in enumerate(extractor(batch["image"].to(device))):
            levels[level].append(features)
    return ReferenceBank.from_features([torch.cat(level) for level in levels])


def check_references(config: PredictConfig):
    """The reference files (``--ref_images``) or the (folder, class) of ``--ref_features``, checked."""
    ref_files = reference_images(config.ref_images, config.num_ref_shot) if config.ref_images else None
    ref_dir, ref_class = reference_folder(config.ref_features) if config.ref_features else (None, None)
    return ref_files, ref_dir, ref_class


def build_extractor(config: PredictConfig, state: dict, ref_dir: Optional[str], ref_class: Optional[str],
                    device: torch.device, extractor: Optional[FeatureExtractor] = None) -> FeatureExtractor:
    """The checkpoint's backbone (``extractor`` when given), after the cheap checks of the reference features."""
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
    return extractor


def load_references(config: PredictConfig, extractor: FeatureExtractor, ref_files: Optional[List[str]],
                    ref_dir: Optional[str], ref_class: Optional[str], device: torch.device) -> Tuple[ReferenceBank, dict]:
    """The bank of ``--ref_images`` (encoded now) or ``--ref_features`` (read and checked), and its record."""
    if ref_files is not None:
        bank = encode_references(ref_files, extractor, config.batch_size, device)
        return bank, {"source": "--ref_images", "dir": os.path.abspath(config.ref_images),
                      "images": [os.path.abspath(p) for p in ref_files], "shots": bank.num_shots}
    bank = reference_features.load_bank(ref_dir, ref_class, extractor.describe(), config.num_ref_shot,
                                        flag="--ref_features").to(device)
    meta = reference_features.read_meta(ref_dir, ref_class, "--ref_features")
    images = [os.path.abspath(p) for p in (meta or {}).get("images", [])][:bank.num_shots]
    return bank, {"source": "--ref_features", "dir": os.path.join(ref_dir, ref_class), "meta": meta,
                  "images": images, "shots": bank.num_shots}


def calibration_identity(config: PredictConfig, state: dict, extractor: FeatureExtractor, bank: ReferenceBank) -> dict:
    """What a calibration is made from and for (:mod:`utils.formats.calibration`)."""
    return {"model": calibration_file.model_fingerprint(state["model"]),
            "references": calibration_file.bank_fingerprint(bank), "shots": bank.num_shots,
            "backbone": extractor.name, "resize": extractor.resize, "amp": config.amp,
            "image_size": extractor.image_size, "fdm_alpha": config.fdm_alpha, "smooth_sigma": config.smooth_sigma}


def class_calibration(model: ResAD, extractor: FeatureExtractor, bank: ReferenceBank, identity: dict,
                      kinds: Sequence[str], read_from: Sequence[str], write_to: Optional[str]) -> Tuple[Calibration, dict]:
    """The class's calibration for the maps ``kinds``: the first valid file of the folders ``read_from``, else
    computed from the references and written to ``write_to`` (None: kept in memory), with a note of why."""
    reasons = []
    for folder in read_from:
        found, why = calibration_file.load(folder, identity, kinds)
        if found is not None:
            return found, {"path": os.path.join(folder, calibration_file.file_name(identity)), "computed": False}
        reasons.append(why)
    found = calibrate_model(model, bank, extractor.feature_sizes, kinds, extractor.image_size, identity["smooth_sigma"])
    record = {"computed": True, "path": None}
    if write_to is not None:
        record["path"] = calibration_file.save(write_to, found, identity)
        stale = [why for why in reasons if "made for another" in why or "lacks" in why or "version" in why]
        if stale:
            print(f"calibration recomputed ({'; '.join(stale)}): {record['path']}")
    return found, record


def load_scorer(config: PredictConfig, extractor: Optional[FeatureExtractor] = None,
                calibration_dir: Optional[str] = None, checked: Optional[tuple] = None) -> Scorer:
    """Build the :class:`Scorer` of ``config``: checkpoint, backbone (``extractor`` when given), references,
    model and calibration (read from the reference-feature folder or ``calibration_dir``, else computed and
    written to ``calibration_dir``).  ``checked``: :func:`check_references`'s result, when already made."""
    ranks = distributed.init(config.device)
    device = resolve_device(distributed.device_of(ranks, config.device))
    configure_device(device)
    state = checkpoint.open_model(config.checkpoint)
    ref_files, ref_dir, ref_class = checked or check_references(config)
    extractor = build_extractor(config, state, ref_dir, ref_class, device, extractor)
    bank, references = load_references(config, extractor, ref_files, ref_dir, ref_class, device)
    model = checkpoint.build_model(state, extractor, config.fdm_alpha, device)
    identity = calibration_identity(config, state, extractor, bank)
    if config.normalization != "references":
        return Scorer(config, device, state, extractor, model, bank, references, None, {"identity": identity}, ranks)
    read_from = ([os.path.join(ref_dir, ref_class)] if ref_dir else []) + ([calibration_dir] if calibration_dir else [])
    kind = ANOMALY_MAP_RECIPES[config.anomaly_map]
    found, record = class_calibration(model, extractor, bank, identity, [kind], read_from,
                                      calibration_dir if ranks.primary else None)
    return Scorer(config, device, state, extractor, model, bank, references, found,
                  dict(record, rule=found.rule, shots=found.shots, identity=identity), ranks)


@dataclass(frozen=True)
class Prediction:
    """The result of one image: its score, the label against the threshold, and its (S, S) anomaly map."""
    score: float
    label: str          # "anomalous" (score above the threshold) or "normal"
    threshold: float
    map: np.ndarray     # float32, the pre-processed image's size (224 x 224 by default)


class Inferencer:
    """Load a checkpoint and one class's references once, then score images one at a time.

    ``ref_images`` (a folder of k normal images) or ``ref_features`` (a class folder of
    extract_ref_features.py); ``preset`` sets the map and the image score as on the command line, and
    ``anomaly_map``/``image_score`` override it; ``threshold`` fixes the threshold, else it comes from
    the references (their maximum, or ``threshold_quantile``).  ``calibration_dir``: a folder to keep the
    class's calibration in (default: in memory only; a ``ref_features`` folder's own file is used when valid).
    The other arguments are those of predict.py.
    """

    def __init__(self, checkpoint: str, ref_images: Optional[str] = None, ref_features: Optional[str] = None,
                 num_ref_shot: Optional[int] = None, preset: str = "authors", anomaly_map: Optional[str] = None,
                 image_score: Optional[str] = None, threshold: Optional[float] = None,
                 threshold_quantile: Optional[float] = None, calibration_dir: Optional[str] = None,
                 extractor: Optional[FeatureExtractor] = None, **options):
        chosen = {**PRESETS[preset], **({"anomaly_map": anomaly_map} if anomaly_map else {}),
                  **({"image_score": image_score} if image_score else {})}
        config = PredictConfig(checkpoint=checkpoint, images=(), out="", ref_images=ref_images,
                               ref_features=ref_features, num_ref_shot=num_ref_shot, threshold=threshold,
                               threshold_quantile=threshold_quantile, num_workers=0, **chosen, **options)
        config = dataclasses.replace(config, normalization="references")
        self.scorer = load_scorer(config, extractor, calibration_dir)
        extractor = self.scorer.extractor
        self._dataset = AnomalyDataset([], image_size=extractor.image_size, mean=extractor.mean, std=extractor.std,
                                       resize=extractor.resize)

    @property
    def threshold(self) -> float:
        return self.scorer.threshold

    def preprocess(self, image: Union[str, Image.Image, torch.Tensor]) -> torch.Tensor:
        """The (3, S, S) network input of a path, a PIL image or a (3, H, W) RGB tensor in [0, 1] (as
        torchvision's ``to_tensor`` gives; it is rounded to 8 bits, as a file is)."""
        if isinstance(image, str):
            return self._dataset.image_transform(read_image(image))
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"a tensor image must be (3, H, W) RGB in [0, 1], got shape {tuple(image.shape)}")
            image = to_pil_image(image.detach().cpu().clamp(0, 1))
        return self._dataset.image_transform(to_rgb(image))

    def predict(self, image: Union[str, Image.Image, torch.Tensor]) -> Prediction:
        """Score one image: a path, a PIL image or a (3, H, W) tensor in [0, 1]."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[Union[str, Image.Image, torch.Tensor]]) -> List[Prediction]:
        """Score several images at once (each score is the same as alone)."""
        scores, maps = self.scorer.score(torch.stack([self.preprocess(image) for image in images]))
        threshold = self.threshold
        return [Prediction(float(s), judge(float(s), threshold), threshold, m.numpy()) for s, m in zip(scores, maps)]
