"""How an image becomes the square network input, and what the center crop cuts off (docs/method.md §2.1).

``crop`` (the authors' pre-processing, the default): the short side is resized to
S, then the centre S x S is cropped, so the borders of a non-square image are
never seen.  ``full``: the whole image is resized to S x S (its aspect ratio is
not kept).  Masks get the same geometry as their images (nearest neighbour).

:func:`crop_window` is the part of an image that the crop keeps, in the image's
own pixel coordinates; :func:`crop_loss` counts the annotated defect pixels of a
mask outside it, and :func:`crop_losses` sums that up over a class's anomalous
images (cheap: square images are skipped unread, and only masks are decoded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

RESIZE_MODES = ("crop", "full")
DEFAULT_RESIZE = "crop"


def check_resize(resize: str) -> str:
    """``resize`` itself; ValueError unless it is one of :data:`RESIZE_MODES` (a programming error)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return resize


def geometry(size: int, resize: str, interpolation: InterpolationMode) -> transforms.Compose:
    """The resize (and, for ``crop``, the center crop) of an image or mask to ``size`` x ``size``."""
    if check_resize(resize) == "full":
        return transforms.Compose([transforms.Resize((size, size), interpolation=interpolation)])
    return transforms.Compose([transforms.Resize(size, interpolation=interpolation), transforms.CenterCrop(size)])


def crop_window(width: int, height: int, size: int) -> Tuple[float, float, float, float]:
    """``(left, top, right, bottom)``: the part of a ``width`` x ``height`` image that the ``crop``
    pre-processing keeps, in the image's pixel coordinates (edges, not pixel centres).

    The short side is resized to ``size`` and the long one to ``int(size * long / short)``
    (torchvision's rule); the crop then starts at ``round((resized - size) / 2)``.
    """
    short, long = min(width, height), max(width, height)
    resized_long = int(size * long / short)
    new_w, new_h = (size, resized_long) if width <= height else (resized_long, size)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    scale_x, scale_y = width / new_w, height / new_h
    return left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y


def crop_loss(mask: np.ndarray, size: int) -> Tuple[int, int]:
    """``(lost, total)``: the defect pixels of the (H, W) ``mask`` whose centres lie outside the
    :func:`crop_window`, and all of its defect pixels."""
    height, width = mask.shape
    left, top, right, bottom = crop_window(width, height, size)
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    keep_x, keep_y = (xs >= left) & (xs < right), (ys >= top) & (ys < bottom)
    total = int(np.count_nonzero(mask))
    kept = int(np.count_nonzero(mask[np.ix_(keep_y, keep_x)]))
    return total - kept, total


@dataclass(frozen=True)
class CropLoss:
    """What the center crop removes from the annotated defects of one class's test images.

    Attributes:
        class_name: the class.
        anomalous: its anomalous images with masks.
        partly: those that lose some of their defect pixels (``entirely`` included).
        entirely: those that lose all of them.
    """

    class_name: str
    anomalous: int
    partly: int
    entirely: int

    def message(self) -> Optional[str]:
        """The warning line, or None when the crop removes no defect pixel."""
        if not self.partly:
            return None
        return (f"{self.class_name}: the center crop removes annotated defect pixels from {self.partly} of "
                f"{self.anomalous} anomalous images ({self.entirely} lose all of theirs); "
                "--resize full keeps the whole image")


def _image_size(path: str) -> Tuple[int, int]:
    """(W, H) of an image from its header (the dataset decodes and checks it fully later)."""
    from .image_io import open_image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError):  # let the full reader say what is wrong, in one line
        return open_image(path).size


def crop_losses(samples: Sequence, size: int, class_name: str) -> CropLoss:
    """The :class:`CropLoss` of the anomalous ``samples`` (:class:`datasets.base.Sample`) of a class."""
    from .image_io import read_mask

    anomalous = partly = entirely = 0
    for sample in samples:
        if not (sample.label and sample.masks):
            continue
        anomalous += 1
        width, height = _image_size(sample.image)
        if width == height:  # the crop keeps a square image whole
            continue
        lost, total = crop_loss(read_mask(sample.masks, (width, height)), size)
        partly += lost > 0
        entirely += total > 0 and lost == total
    return CropLoss(class_name, anomalous, partly, entirely)
