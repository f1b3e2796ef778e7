"""Reading images and ground-truth masks from disk, robustly.

Every file a dataset loader touches goes through :func:`open_image`, which
fully decodes the file (so a truncated PNG or JPEG is caught here, not as a
cryptic error deep inside a DataLoader worker) and turns any failure into a
one-line :class:`~utils.errors.UserError` naming the file.

Valid but unusual encodings are accepted: grayscale, RGBA, palette and 16-bit
images become 8-bit RGB with :func:`to_rgb`; masks of any mode become boolean
arrays with :func:`mask_to_bool`.
"""
from __future__ import annotations

import os
import struct
import warnings
from typing import Sequence

import numpy as np
from PIL import Image

from utils.errors import UserError

_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
"""Pillow modes of integer images deeper than 8 bits (16-bit PNG/TIFF)."""

_SINGLE_CHANNEL_MODES = _HIGH_BIT_DEPTH_MODES | {"1", "L", "F"}
"""Modes whose raw pixel values can be tested against zero directly."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error,
                  Image.DecompressionBombError)
"""What Pillow raises on a truncated, corrupt or non-image file."""


def open_image(path: str) -> Image.Image:
    """Open and fully decode an image file, in whatever mode it is stored.

    Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (its default)
    for truncated files to be detected.

    Raises:
        UserError: the file is missing, unreadable, truncated or not an image.
    """
    if not os.path.isfile(path):
        raise UserError(f"image file {path} not found; check the dataset folder")
    try:
        with Image.open(path) as image:
            image.load()  # decode every pixel now: lazy decoding hides truncation
            return image
    except PermissionError:
        raise UserError(f"cannot read image {path}: permission denied; fix its permissions") from None
    except _DECODE_ERRORS as err:
        raise UserError(f"cannot read image {path}: file is truncated or not an image "
                        f"({err}); replace or remove it") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB.

    16-bit data (modes ``I;16*``, and ``I``, which Pillow also uses for 16-bit
    PNGs) is scaled from [0, 65535] to [0, 255], not clipped. Alpha channels
    are dropped; palette images are expanded through their palette.
    """
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.rint(values).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def mask_to_bool(mask: Image.Image) -> np.ndarray:
    """Boolean (H, W) array: True where any channel of ``mask`` is non-zero.

    High bit-depth masks are tested on their raw values, so a 16-bit mask
    holding small labels (1, 2, ...) is not lost to 8-bit scaling.
    """
    if mask.mode in _SINGLE_CHANNEL_MODES:
        return np.asarray(mask) > 0
    return np.asarray(mask.convert("RGB")).max(axis=2) > 0


def read_image(path: str) -> Image.Image:
    """Read ``path`` as an 8-bit RGB image (see :func:`open_image`)."""
    return to_rgb(open_image(path))


_warned_mask_sizes: set[str] = set()
"""Mask files already reported as having the wrong size (warn once per file)."""


def read_mask(paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """Union of the masks in ``paths`` as a boolean array of ``size`` (W, H).

    A mask whose size differs from ``size`` (its image's size) is resized with
    nearest-neighbour interpolation, with a warning once per file. An empty
    ``paths`` gives an all-False mask.
    """
    width, height = size
    union = np.zeros((height, width), dtype=bool)
    for path in paths:
        mask = open_image(path)
        if mask.size != size:
            if path not in _warned_mask_sizes:
                _warned_mask_sizes.add(path)
                warnings.warn(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is "
                              f"{width}x{height}; resizing the mask (nearest)", stacklevel=2)
            mask = Image.fromarray(mask_to_bool(mask)).resize(size, Image.Resampling.NEAREST)
        union |= mask_to_bool(mask)
    return union
