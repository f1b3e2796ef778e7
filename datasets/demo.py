"""A small synthetic dataset in MVTec AD layout, for the offline demo.

:func:`generate_demo_dataset` draws 8 classes (see
:mod:`datasets.demo_draw`): 5 seen and 3 unseen, each a mix of textures
and objects, every unseen class of the same kind as some seen class without
copying it. The result is read with :func:`list_samples` like MVTec AD, and
``<root>/<cls>/train/good`` also serves as a few-shot reference folder.

Generation is deterministic for a seed, takes a few seconds, and is atomic:
the dataset is written to a hidden sibling folder, marked complete, then
renamed into place, so an interrupted run never leaves a folder that looks
complete. A complete dataset with the same parameters is reused.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import replace

import numpy as np
from PIL import Image

from utils.errors import UserError

from . import mvtec
from .demo_draw import DEMO_CLASSES, add_defect, to_uint8

GENERATOR_VERSION = 2
MARKER = ".complete"
"""File written last, holding the generator version and parameters."""

DEMO_SEEN = ("stripes", "checker", "marble", "nut", "pill")
DEMO_UNSEEN = ("weave", "dots", "chip")
assert set(DEMO_SEEN + DEMO_UNSEEN) == set(DEMO_CLASSES)

LAYOUT = replace(mvtec.LAYOUT, title="synthetic demo")
list_samples = LAYOUT.list_samples

_TRAIN, _TEST_GOOD, _TEST_ANOMALOUS = range(3)
"""Stream identifiers: each image has its own random stream, so changing one
count does not change the other images."""


DEFAULT_TRAIN_IMAGES = 24
"""Normal training images per class of the demo dataset (its reference images too)."""


def generate_demo_dataset(root: str, seed: int = 0, n_train: int = DEFAULT_TRAIN_IMAGES, n_test_good: int = 8,
                          n_test_anomalous: int = 12) -> str:
    """Write the demo dataset to ``root`` (unless already there) and return ``root``.

    Args:
        root: the dataset folder to create; it may exist if it is empty or
            holds an earlier demo dataset (which is then replaced).
        seed: the random seed; the same seed gives byte-identical files.
        n_train: normal training images per class (``train/good``).
        n_test_good: normal test images per class (``test/good``).
        n_test_anomalous: anomalous test images per class, spread over the
            class's 2-3 defect types (``test/<type>``, masks in
            ``ground_truth/<type>/<name>_mask.png``).

    Raises:
        UserError: ``root`` holds files that are not a demo dataset.
    """
    params = {"generator": "resad-synthetic-demo", "version": GENERATOR_VERSION, "seed": seed,
              "n_train": n_train, "n_test_good": n_test_good,
              "n_test_anomalous": n_test_anomalous}
    if _is_complete(root, params):
        return root
    _check_replaceable(root)
    parent, name = os.path.split(os.path.abspath(root))
    staging = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
    os.makedirs(staging)
    try:
        for index, class_name in enumerate(DEMO_SEEN + DEMO_UNSEEN):
            _write_class(os.path.join(staging, class_name), class_name, (seed, index),
                         n_train, n_test_good, n_test_anomalous)
        with open(os.path.join(staging, MARKER), "w") as marker:
            json.dump(params, marker, sort_keys=True)
        if not _is_complete(root, params):  # another process may have finished first
            _move_into_place(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _is_complete(root: str, params: dict) -> bool:
    """Whether ``root`` holds a finished demo dataset made with ``params``."""
    try:
        with open(os.path.join(root, MARKER)) as marker:
            return json.load(marker) == params
    except (OSError, ValueError):
        return False


def _check_replaceable(root: str) -> None:
    """Refuse to replace a folder that holds anything but (part of) a demo dataset."""
    if not os.path.exists(root):
        return
    if not os.path.isdir(root):
        raise UserError(f"demo dataset path {root} is a file; choose a folder path for the demo data")
    foreign = sorted(name for name in os.listdir(root)
                     if not name.startswith(".") and name not in DEMO_CLASSES)
    if foreign:
        raise UserError(f"{root} holds files that are not a synthetic demo dataset "
                        f"({', '.join(foreign[:3])}); choose an empty or new folder for the demo data")


def _move_into_place(staging: str, root: str) -> None:
    """Replace ``root`` (if any) by the finished ``staging`` folder."""
    if not os.path.exists(root):
        os.replace(staging, root)
        return
    retired = f"{staging}.old"
    os.replace(root, retired)
    os.replace(staging, root)
    shutil.rmtree(retired, ignore_errors=True)


def _save_png(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _write_class(class_dir: str, class_name: str, key: tuple[int, int], n_train: int,
                 n_test_good: int, n_test_anomalous: int) -> None:
    """Draw and save every image (and mask) of one class."""
    demo_class = DEMO_CLASSES[class_name]

    def stream(kind: int, index: int) -> np.random.Generator:
        return np.random.default_rng([*key, kind, index])

    for kind, count, folder in ((_TRAIN, n_train, "train/good"), (_TEST_GOOD, n_test_good, "test/good")):
        for index in range(count):
            rng = stream(kind, index)
            image, _ = demo_class.render(rng)
            _save_png(to_uint8(rng, image), os.path.join(class_dir, folder, f"{index:03d}.png"))

    defects = demo_class.defects
    for index in range(n_test_anomalous):
        rng = stream(_TEST_ANOMALOUS, index)
        defect = defects[index % len(defects)]
        name = f"{index // len(defects):03d}"
        image, foreground = demo_class.render(rng)
        image, mask = add_defect(rng, image, foreground, defect, rng.uniform(*demo_class.strength),
                                 demo_class.max_fraction)
        _save_png(to_uint8(rng, image), os.path.join(class_dir, "test", defect, f"{name}.png"))
        _save_png(mask.astype(np.uint8) * 255,
                  os.path.join(class_dir, "ground_truth", defect, f"{name}_mask.png"))
