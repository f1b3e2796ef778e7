"""Which files and folders of a dataset tree count: listing rules shared by every layout.

Hidden entries (``.DS_Store``, ``._x.png``) and files without an image
extension (``readme.txt``, ``license.md``) are ignored everywhere; listings are
sorted by name so that every run sees the same order.
"""
from __future__ import annotations

import os

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""File name suffixes (compared case-insensitively) treated as images."""


def is_image_file(path: str) -> bool:
    """Whether ``path`` names a visible file with an image extension (by name only)."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(folder: str) -> list[str]:
    """Sorted paths of the visible image files directly inside ``folder`` ([] if missing)."""
    if not os.path.isdir(folder):
        return []
    paths = (os.path.join(folder, name) for name in sorted(os.listdir(folder)))
    return [path for path in paths if is_image_file(path) and os.path.isfile(path)]


def list_subfolders(folder: str) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder`` ([] if missing)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith(".") and os.path.isdir(os.path.join(folder, name)))


def walk_image_files(folder: str) -> list[str]:
    """Sorted paths of the visible image files anywhere under ``folder`` (hidden folders skipped,
    symbolic links to folders not followed); [] if missing."""
    found = []
    for parent, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [os.path.join(parent, name) for name in sorted(names)
                  if is_image_file(name) and os.path.isfile(os.path.join(parent, name))]
    return found
