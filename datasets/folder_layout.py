"""Listing samples of datasets stored as class folders with train/ and test/ folders.

MVTec AD, MPDD, BTAD, MVTec 3D-AD, MVTec LOCO and BraTS all store a class as

    <root>/<cls>/train/<normal>/[<image_subdir>/]*        normal training images
    <root>/<cls>/test/<type>/[<image_subdir>/]*           test images, one folder per type

and differ only in the name of the normal type, an optional image sub-folder
and where the masks of an anomalous image are. :class:`FolderLayout` captures
exactly those differences; the per-dataset modules are one instance each.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from utils.errors import UserError

from .base import ANOMALOUS, NORMAL, Sample
from .files import is_image_file, list_image_files, list_subfolders
from .layout import DEFAULT_HINT, LAYOUTS, check_root, missing_path_error

SPLITS = ("train", "test")


def check_split(split: str) -> None:
    """Reject a split name other than ``"train"`` or ``"test"`` (a programming error)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclass(frozen=True)
class FolderLayout:
    """A class-folder layout, parameterised by its sub-paths and its mask rule.

    Attributes:
        title: human name of the dataset, used in messages (``"MVTec AD"``).
        layout: key of :data:`datasets.layout.LAYOUTS` (``"mvtec"``).
        normal_type: name of the folder of normal images (``"good"``, ``"ok"``).
        mask_pattern: glob, relative to the class folder, of the mask files of
            an anomalous image, with ``{type}`` (its folder) and ``{stem}`` (its
            file name without extension), e.g.
            ``"ground_truth/{type}/{stem}_mask.png"``. Every image file that
            matches belongs to the mask (their union).
        image_subdir: sub-folder of each type folder that holds the images
            (``"rgb"`` for MVTec 3D-AD; empty otherwise).
        has_train_split: False for test-only datasets (BraTS).
        masks_optional: a class whose anomalous test images have no masks at all is
            labelled per image only (its samples have empty ``masks``); a class where
            only some lack them is still an error (the user's own folders).
    """

    title: str
    layout: str
    normal_type: str
    mask_pattern: str
    image_subdir: str = ""
    has_train_split: bool = True
    masks_optional: bool = False

    def list_samples(self, root: str, class_name: str, split: str,
                     hint: str = DEFAULT_HINT) -> list[Sample]:
        """The samples of one class and split, sorted by (type folder, file name).

        Args:
            root: the dataset root (the folder holding the class folders).
            class_name: the class folder name.
            split: ``"train"`` (normal images) or ``"test"`` (normal and anomalous).
            hint: the flag or setting named in error messages.

        Raises:
            UserError: missing root, class or split folder; a layout mismatch;
                an anomalous image without mask; no images at all.
        """
        check_split(split)
        check_root(root, hint)
        if split == "train" and not self.has_train_split:
            raise UserError(f"{self.title} has no training split ({root}); use it only as a "
                            f"test (target) dataset")
        class_dir = os.path.join(root, class_name)
        if split == "train":
            expected = self._image_folder(class_dir, split, self.normal_type)
        else:
            expected = os.path.join(class_dir, split)
        if not os.path.isdir(expected):
            raise missing_path_error(root, expected, self.title, self.layout, class_name, hint)

        types = [self.normal_type] if split == "train" else list_subfolders(expected)
        samples = [sample for defect_type in types
                   for sample in self._samples_of_type(class_dir, class_name, split, defect_type)]
        if self.masks_optional:
            self._check_masks_all_or_none(class_dir, class_name, samples)
        if not samples:
            raise UserError(f"no {split} images for class '{class_name}' in {expected} "
                            f"({self.title} layout: {LAYOUTS[self.layout].description}); check {hint}")
        return samples

    def _image_folder(self, class_dir: str, split: str, defect_type: str) -> str:
        parts = [class_dir, split, defect_type] + ([self.image_subdir] if self.image_subdir else [])
        return os.path.join(*parts)

    def _samples_of_type(self, class_dir: str, class_name: str, split: str,
                         defect_type: str) -> list[Sample]:
        normal = defect_type == self.normal_type
        return [Sample(image=path, label=NORMAL if normal else ANOMALOUS,
                       masks=() if normal else self._mask_files(class_dir, defect_type, path),
                       class_name=class_name)
                for path in list_image_files(self._image_folder(class_dir, split, defect_type))]

    def _expected_mask(self, class_dir: str, defect_type: str, image_path: str) -> str:
        stem = os.path.splitext(os.path.basename(image_path))[0]
        return os.path.join(class_dir, self.mask_pattern.format(type=defect_type, stem=stem))

    def _mask_files(self, class_dir: str, defect_type: str, image_path: str) -> tuple[str, ...]:
        """The mask files of an anomalous image; UserError if there are none (unless masks are optional)."""
        stem = os.path.splitext(os.path.basename(image_path))[0]
        pattern = self.mask_pattern.format(type=glob.escape(defect_type), stem=glob.escape(stem))
        matches = glob.glob(os.path.join(glob.escape(class_dir), pattern))
        masks = tuple(sorted(path for path in matches if is_image_file(path) and os.path.isfile(path)))
        if not masks and not self.masks_optional:
            raise UserError(f"no ground-truth mask for {image_path} (expected "
                            f"{self._expected_mask(class_dir, defect_type, image_path)}); add the mask or remove "
                            "the image")
        return masks

    def _check_masks_all_or_none(self, class_dir: str, class_name: str, samples: list[Sample]) -> None:
        """UserError when some, but not all, anomalous images of a class have masks (naming the first without)."""
        anomalous = [s for s in samples if s.label]
        unmasked = [s for s in anomalous if not s.masks]
        if unmasked and len(unmasked) < len(anomalous):
            image = unmasked[0].image
            folder = os.path.dirname(os.path.dirname(image) if self.image_subdir else image)
            expected = self._expected_mask(class_dir, os.path.basename(folder), image)
            raise UserError(f"no ground-truth mask for {image} (expected {expected}), "
                            f"but {len(anomalous) - len(unmasked)} other anomalous images of class '{class_name}' "
                            f"have masks; add the missing masks ({len(unmasked)} of {len(anomalous)} images lack "
                            "one), or remove every mask of the class to evaluate it on image labels only")
