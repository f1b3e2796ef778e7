"""VisA (original release), listed from ``<root>/split_csv/1cls.csv``.

The CSV has columns ``object, split, label, image, mask``; ``label`` is
``normal`` or ``anomaly`` and the paths are relative to the root (images under
``<cls>/Data/Images``, masks under ``<cls>/Data/Masks``).
"""
from __future__ import annotations

import os

import pandas as pd

from utils.errors import UserError

from .base import ANOMALOUS, NORMAL, Sample
from .folder_layout import check_split
from .layout import DEFAULT_HINT, check_root, missing_path_error

TITLE = "VisA"
SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS}


def read_split_csv(root: str, hint: str = DEFAULT_HINT) -> pd.DataFrame:
    """The split table of a VisA root, every cell a string (missing masks are "")."""
    check_root(root, hint)
    path = os.path.join(root, SPLIT_CSV)
    if not os.path.isfile(path):
        raise missing_path_error(root, path, TITLE, "visa", hint=hint)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}; restore the file from the VisA release") from None
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; restore the file "
                        f"from the VisA release")
    return table


def list_samples(root: str, class_name: str, split: str, hint: str = DEFAULT_HINT) -> list[Sample]:
    """The samples of one VisA class and split, sorted by image path.

    Raises:
        UserError: missing root or CSV, a layout mismatch, an unknown class, an
            unknown label, an image or mask listed but absent, or no images.
    """
    check_split(split)
    table = read_split_csv(root, hint)
    csv_path = os.path.join(root, SPLIT_CSV)
    of_class = table[table["object"] == class_name]
    if of_class.empty:
        raise UserError(f"class '{class_name}' not found in {csv_path}; check {hint}")
    rows = of_class[of_class["split"] == split].sort_values("image")
    if rows.empty:
        raise UserError(f"no {split} images for class '{class_name}' in {csv_path}; check {hint}")
    return [_sample(root, row, class_name, csv_path) for row in rows.itertuples(index=False)]


def _sample(root: str, row, class_name: str, csv_path: str) -> Sample:
    """One CSV row as a Sample, checking that its files exist."""
    if row.label not in LABELS:
        raise UserError(f"unknown label '{row.label}' for {row.image} in {csv_path} "
                        f"(expected normal or anomaly); fix the file")
    image = os.path.join(root, row.image)
    if not os.path.isfile(image):
        raise UserError(f"image {image} listed in {csv_path} not found; restore it from the VisA release")
    label = LABELS[row.label]
    if label == NORMAL:
        return Sample(image=image, label=label, masks=(), class_name=class_name)
    mask = os.path.join(root, row.mask) if row.mask else ""
    if not os.path.isfile(mask):
        raise UserError(f"no ground-truth mask for {image} (expected {mask or 'a mask path'} "
                        f"in {csv_path}); restore it from the VisA release")
    return Sample(image=image, label=label, masks=(mask,), class_name=class_name)
