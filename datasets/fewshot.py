"""Few-shot reference folders: ``<root>/<cls>/train/good/*``, flat, any image extension.

This is the layout of the authors' ``resad-data`` release (``4shot/``,
``8shot/``) for every dataset; an MVTec-layout dataset root also fits it.
"""
from __future__ import annotations

import os
from typing import Optional

from utils.errors import UserError

from .files import list_image_files

FEWSHOT_HINT = "--few_shot_dir"


def list_fewshot_images(root: str, class_name: str, max_shots: Optional[int] = None,
                        hint: str = FEWSHOT_HINT) -> list[str]:
    """Sorted paths of the reference images of one class; the first ``max_shots`` if given.

    Raises:
        UserError: the class folder is missing or holds no image, or fewer than
            ``max_shots`` images.
    """
    folder = os.path.join(root, class_name, "train", "good")
    if not os.path.isdir(folder):
        raise UserError(f"few-shot folder {folder} not found (expected <root>/<cls>/train/good "
                        f"with reference images); check {hint}")
    images = list_image_files(folder)
    if not images:
        raise UserError(f"few-shot folder {folder} holds no images (.png/.jpg/.jpeg/.bmp/.tif); "
                        f"check {hint}")
    if max_shots is None:
        return images
    if max_shots < 1:
        raise ValueError(f"max_shots must be at least 1, got {max_shots}")
    if len(images) < max_shots:
        raise UserError(f"{folder} holds {len(images)} reference images but {max_shots} are "
                        f"needed; use a folder with at least {max_shots} shots or ask for fewer")
    return images[:max_shots]
