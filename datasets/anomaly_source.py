"""Where stage 2 gets its anomalous images: the source's test split (real), synthetic defects, or both.

``--anomaly_source real`` uses the anomalous test images of the seen classes
with their masks (the authors' protocol); ``synthetic`` uses the normal training
images alone and turns a seeded part of them into anomalous ones on the fly
(:class:`SyntheticAnomalyDataset`, in the loader workers); ``mixed`` does both.
The default is ``real`` when the source has anomalous images with masks, else
``synthetic`` (e.g. a few-shot folder with ``<cls>/train/good`` only).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode

from utils.errors import UserError

from .base import ANOMALOUS, AnomalyDataset, Sample
from .defects import DEFECT_FAMILIES, synthesize_anomaly
from .image_io import read_image
from .registry import Setting, training_samples
from .resize import DEFAULT_RESIZE, geometry

ANOMALY_SOURCES = ("real", "synthetic", "mixed")


class SyntheticAnomalyDataset(AnomalyDataset):
    """An :class:`AnomalyDataset` whose normal images become anomalous with probability ``fraction``.

    Whether item ``i`` is made anomalous, and how, depends only on
    ``(seed, epoch, i)``: the same in any worker, different each epoch
    (:meth:`set_epoch`). The defect's donor image is another normal image of the
    list. Real anomalous samples pass through unchanged.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int = 224, mean=None, std=None,
                 fraction: float = 0.5, families: Sequence[str] = tuple(DEFECT_FAMILIES), seed: int = 0,
                 use_foreground: bool = True, resize: str = DEFAULT_RESIZE):
        kwargs = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        super().__init__(samples, image_size=image_size, resize=resize, **kwargs)
        unknown = [f for f in families if f not in DEFECT_FAMILIES]
        if unknown or not families:
            raise UserError(f"--synthetic_defects: unknown family {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(DEFECT_FAMILIES)}")
        self.fraction, self.families, self.seed = fraction, tuple(families), seed
        self.use_foreground = use_foreground
        self.epoch = 0
        self.normal_indices = np.flatnonzero([not s.label for s in self.samples])
        self.geometry = geometry(image_size, resize, InterpolationMode.BICUBIC)
        self.normalize = self.image_transform.transforms[-1]

    def set_epoch(self, epoch: int) -> None:
        """Draw the anomalies of ``epoch`` (call before iterating; workers copy the dataset)."""
        self.epoch = epoch

    def _array(self, path: str) -> np.ndarray:
        return np.asarray(self.geometry(read_image(path)), dtype=np.float32) / 255.0

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if sample.label or len(self.normal_indices) < 2 or rng.random() >= self.fraction:
            return super().__getitem__(index)
        donors = self.normal_indices[self.normal_indices != index]
        image = self._array(sample.image)
        donor = self._array(self.samples[int(donors[rng.integers(len(donors))])].image)
        defective, mask = synthesize_anomaly(rng, image, donor, self.families, self.use_foreground)
        return {
            "image": self.normalize(torch.from_numpy(defective).permute(2, 0, 1).contiguous()),
            "mask": torch.from_numpy(mask.astype(np.float32)).unsqueeze(0),
            "label": ANOMALOUS,
            "class_name": sample.class_name,
            "path": sample.image,
        }


def choose_anomaly_source(requested: Optional[str], setting: Setting, root: str) -> tuple[str, list[Sample]]:
    """The anomaly source of stage 2 and its sample list; prints the choice.

    Raises:
        UserError: ``real`` or ``mixed`` asked for a source without anomalous images.
    """
    if requested not in (None, "auto") + ANOMALY_SOURCES:
        raise UserError(f"--anomaly_source {requested}: choose one of {', '.join(ANOMALY_SOURCES)}")
    normals = training_samples(setting.source, root, setting.seen_classes, stage=1)
    if requested == "synthetic":
        real, why = None, "as asked"
    elif not _has_test_split(root, setting.seen_classes):
        if requested in ("real", "mixed"):
            raise UserError(f"--anomaly_source {requested}: the seen classes under {root} have no test split "
                            f"(<cls>/test) with anomalous images; use --anomaly_source synthetic")
        real, why = None, "the source has normal images only"
    else:  # a broken test split is an error, not a reason to switch silently
        real = training_samples(setting.source, root, setting.seen_classes, stage=2)
        why = "the source's test split has anomalous images with masks"
        if not any(s.label for s in real):
            if requested in ("real", "mixed"):
                raise UserError(f"--anomaly_source {requested}: the seen classes of {setting.source} have no "
                                f"anomalous test images; use --anomaly_source synthetic")
            real, why = None, "the source has no anomalous test images"
        elif any(s.label and not s.masks for s in real):  # image labels only: stage 2 needs masks
            unmasked = next(s.image for s in real if s.label and not s.masks)
            if requested in ("real", "mixed"):
                raise UserError(f"--anomaly_source {requested}: anomalous test images of the seen classes have no "
                                f"pixel masks (e.g. {unmasked}); use --anomaly_source synthetic")
            real, why = None, "the source's anomalous test images have no pixel masks"
    chosen = requested if requested in ANOMALY_SOURCES else ("real" if real is not None else "synthetic")
    if requested in ANOMALY_SOURCES:
        why = "as asked"
    print(f"stage-2 anomalies: {chosen} ({why}; --anomaly_source real|synthetic|mixed)")
    return chosen, (normals if chosen == "synthetic" else real)


def _has_test_split(root: str, classes: Sequence[str]) -> bool:
    """Whether the source has test images at all: a VisA split file, or a ``<cls>/test`` folder."""
    return os.path.isfile(os.path.join(root, "split_csv", "1cls.csv")) or any(
        os.path.isdir(os.path.join(root, c, "test")) for c in classes)
