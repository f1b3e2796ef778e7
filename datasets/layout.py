"""The known on-disk layouts: how to recognise them and how to explain a mismatch.

:func:`detect_layout` guesses which layout a dataset root has, so that an error
can say "this has the VisA layout, but MVTec AD was expected" instead of a bare
"not found". :func:`check_root` and :func:`missing_path_error` build the
one-line messages shared by every layout module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from utils.errors import UserError

from .files import list_subfolders

DEFAULT_HINT = "the dataset directory"
"""What an error tells the user to check when the caller names no flag."""


@dataclass(frozen=True)
class LayoutKind:
    """A family of datasets stored the same way.

    Attributes:
        title: human name, e.g. ``"BTAD"``.
        description: short description of the layout, shown when it was expected.
        signature: what :func:`detect_layout` recognises it by, shown when found.
    """

    title: str
    description: str
    signature: str


LAYOUTS = {
    "mvtec": LayoutKind("MVTec AD / MPDD",
                        "<cls>/train/good/*.png, <cls>/test/<type>/*.png, "
                        "<cls>/ground_truth/<type>/<name>_mask.png",
                        "<cls>/train/good and <cls>/test"),
    "visa": LayoutKind("VisA", "split_csv/1cls.csv with paths relative to the root",
                       "split_csv/1cls.csv"),
    "btad": LayoutKind("BTAD", "<cls>/train/ok/*, <cls>/test/{ok,ko}/*, <cls>/ground_truth/ko/<name>.*",
                       "<cls>/train/ok"),
    "mvtec3d": LayoutKind("MVTec 3D-AD", "<cls>/{train,test}/<type>/rgb/*.png, "
                          "<cls>/test/<type>/gt/<name>.png", "<cls>/train/good/rgb"),
    "mvtecloco": LayoutKind("MVTec LOCO", "<cls>/train/good/*.png, <cls>/test/<type>/*.png, "
                            "<cls>/ground_truth/<type>/<name>/*.png",
                            "<cls>/test/logical_anomalies"),
    "brats": LayoutKind("BraTS", "brain/test/{good,lesion}/*.jpg, "
                        "brain/ground_truth/lesion/<name>_mask.png", "<cls>/test/lesion"),
    "fewshot": LayoutKind("few-shot reference", "<cls>/train/good/*",
                          "<cls>/train/good without <cls>/test"),
}
"""Every layout :func:`detect_layout` can report, by key."""


def _class_folder_layout(folder: str) -> Optional[str]:
    """The layout key that a single class folder belongs to, or None."""
    def has(*parts: str) -> bool:
        return os.path.isdir(os.path.join(folder, *parts))

    if has("train", "good", "rgb") or has("test", "good", "rgb"):
        return "mvtec3d"
    if has("train", "ok") or has("test", "ko"):
        return "btad"
    if has("test", "logical_anomalies") or has("test", "structural_anomalies"):
        return "mvtecloco"
    if has("test", "lesion"):
        return "brats"
    if has("train", "good"):
        return "mvtec" if has("test") else "fewshot"
    return None


def detect_layout(root: str) -> Optional[str]:
    """Guess the layout of a dataset root: a key of :data:`LAYOUTS`, or None.

    MVTec AD and MPDD share one layout (``"mvtec"``); a folder holding only
    ``<cls>/train/good`` is a few-shot reference folder (``"fewshot"``).
    """
    if os.path.isfile(os.path.join(root, "split_csv", "1cls.csv")):
        return "visa"
    for name in list_subfolders(root):
        layout = _class_folder_layout(os.path.join(root, name))
        if layout is not None:
            return layout
    return None


def check_root(root: str, hint: str = DEFAULT_HINT) -> None:
    """Raise a UserError unless ``root`` is an existing, non-empty folder."""
    if not root:
        raise UserError(f"{hint} is empty: give the dataset root folder" if hint.startswith("--")
                        else f"no dataset root given; check {hint}")
    if not os.path.exists(root):
        raise UserError(f"dataset root {root} does not exist; check {hint}")
    if not os.path.isdir(root):
        raise UserError(f"dataset root {root} is not a folder; check {hint}")
    if not any(not name.startswith(".") for name in os.listdir(root)):
        raise UserError(f"dataset root {root} is empty; put the dataset there or check {hint}")


def missing_path_error(root: str, expected: str, title: str, layout: str,
                       class_name: Optional[str] = None, hint: str = DEFAULT_HINT) -> UserError:
    """The most helpful error for a path of the expected layout that does not exist.

    In order: the root has another known layout; the root is a single class
    folder rather than the dataset root; the class folder is missing; only
    ``expected`` is missing.

    Args:
        root: the dataset root.
        expected: the missing file or folder.
        title: human name of the expected dataset, e.g. ``"MPDD"``.
        layout: key of the expected layout in :data:`LAYOUTS`.
        class_name: the class being listed, if any.
        hint: the flag or setting the user should check.
    """
    found = detect_layout(root)
    if found is not None and found != layout:
        return UserError(f"{root} has the {LAYOUTS[found].title} layout (found "
                         f"{LAYOUTS[found].signature}) but {title} was expected "
                         f"({LAYOUTS[layout].description}); check {hint}")
    inner = _class_folder_layout(root)
    if found is None and inner is not None:
        return UserError(f"{root} is a single class folder ({LAYOUTS[inner].title} layout); "
                         f"pass the folder that contains the class folders (check {hint})")
    if class_name is not None and not os.path.isdir(os.path.join(root, class_name)):
        return UserError(f"class '{class_name}' not found under {root} (expected {expected}); "
                         f"check {hint}")
    return UserError(f"{expected} not found ({title} layout: {LAYOUTS[layout].description}); "
                     f"check {hint}")
