"""Synthetic defects drawn into normal images, with exact pixel masks (no external data).

Every defect family is a function ``(rng, image, source, region) -> (image, mask)``:

* ``image``: float32 (H, W, 3) in [0, 1], the normal image to damage (not modified);
* ``source``: another normal image of the same size, the donor of foreign content;
* ``region``: bool (H, W) where the defect may go (the foreground estimate of an
  object, or everything for a texture);
* returns the defective copy and the bool mask of the pixels it changed; outside
  the mask the image is untouched, and the mask lies inside ``region``.

Families (:data:`DEFECT_FAMILIES`): ``cut_paste`` (a rotated patch of the donor),
``scar`` (a thin rotated strip of the donor), ``perlin_texture`` (a Perlin-noise
shaped region blended with the donor, DRAEM-style, the donor standing in for the
texture dataset) and ``local_corruption`` (a local warp, blur or colour shift).
Image operations are numpy, scipy.ndimage and scikit-image.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
from scipy import ndimage
from skimage import draw, filters, morphology, transform

DefectFn = Callable[[np.random.Generator, np.ndarray, np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]

MIN_AREA_FRACTION = 0.002
"""A defect smaller than this fraction of the image is redrawn."""
MAX_AREA_FRACTION = 0.25


# ----------------------------------------------------------------------------- foreground

def foreground_estimate(image: np.ndarray, min_fraction: float = 0.05,
                        max_fraction: float = 0.9) -> Optional[np.ndarray]:
    """The object of an object-class image as a bool (H, W) mask, or None for a texture.

    The background colour is the median of the image border; pixels far from it
    (Otsu threshold of the colour distance) form the object, closed and
    hole-filled, keeping the largest component. None when that does not look like
    one object on a plain background (a border as varied as the image, an object too
    small or too large, or touching most of the border).
    """
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    distance = np.linalg.norm(image - np.median(border, axis=0), axis=2)
    if float(distance.max()) < 1e-3:
        return None
    threshold = filters.threshold_otsu(distance)
    edge_distance = np.concatenate([distance[0], distance[-1], distance[:, 0], distance[:, -1]])
    if np.percentile(edge_distance, 75) > 0.5 * threshold:  # the border is as varied as the rest: a texture
        return None
    mask = distance > threshold
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, morphology.disk(3), border_value=0))
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    if not (min_fraction <= mask.mean() <= max_fraction) or edge.mean() > 0.5:
        return None
    return mask


def defect_region(image: np.ndarray, use_foreground: bool = True) -> np.ndarray:
    """Where defects may go: the (slightly eroded) foreground estimate, else the whole image."""
    if use_foreground:
        fg = foreground_estimate(image)
        if fg is not None:
            eroded = ndimage.binary_erosion(fg, iterations=3)
            return eroded if eroded.any() else fg
    return np.ones(image.shape[:2], dtype=bool)


# ----------------------------------------------------------------------------- shapes

def perlin_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``cells`` lattice cells per axis, about in [-1, 1]."""
    h, w = shape
    angles = rng.uniform(0, 2 * np.pi, (cells[0] + 1, cells[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, cells[0], h, endpoint=False)[:, None] * np.ones((1, w))
    x = np.linspace(0, cells[1], w, endpoint=False)[None, :] * np.ones((h, 1))
    iy, ix = y.astype(int), x.astype(int)
    fy, fx = y - iy, x - ix

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[iy + dy, ix + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade_y, fade_x = [t * t * t * (t * (6 * t - 15) + 10) for t in (fy, fx)]
    top = corner(0, 0) + fade_x * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + fade_x * (corner(1, 1) - corner(1, 0))
    return (np.sqrt(2) * (top + fade_y * (bottom - top))).astype(np.float32)


def perlin_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A blobby bool mask: Perlin noise at a random scale above a random threshold."""
    scale = int(2 ** rng.integers(1, 4))
    noise = perlin_noise(rng, shape, (scale, scale))
    noise = transform.rotate(noise, rng.uniform(-90, 90), mode="reflect")
    return noise > rng.uniform(0.35, 0.55)


def rotated_rectangle(shape: tuple[int, int], centre: tuple[float, float], length: float, width: float,
                      degrees: float) -> np.ndarray:
    """Bool mask of a rectangle (``length`` x ``width``) rotated by ``degrees`` around ``centre`` (y, x)."""
    angle = np.deg2rad(degrees)
    along, across = np.array([np.sin(angle), np.cos(angle)]), np.array([np.cos(angle), -np.sin(angle)])
    corners = np.array([np.asarray(centre) + sa * length / 2 * along + sb * width / 2 * across
                        for sa, sb in ((-1, -1), (-1, 1), (1, 1), (1, -1))])
    mask = np.zeros(shape, dtype=bool)
    rr, cc = draw.polygon(corners[:, 0], corners[:, 1], shape=shape)
    mask[rr, cc] = True
    return mask


def _centre_in(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    points = np.argwhere(region)
    y, x = points[rng.integers(len(points))]
    return float(y), float(x)


def _shifted(rng: np.random.Generator, source: np.ndarray) -> np.ndarray:
    """The donor image, randomly rolled, flipped and rotated by quarter turns (same shape when square)."""
    h, w = source.shape[:2]
    out = np.roll(source, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if h == w:
        out = np.rot90(out, int(rng.integers(4)))
    return np.ascontiguousarray(out)


def _apply(image: np.ndarray, changed: np.ndarray, mask: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """``image`` with the pixels of ``mask`` taken from ``changed``; the mask itself."""
    out = image.copy()
    out[mask] = np.clip(changed[mask], 0, 1)
    return out.astype(np.float32), mask


# ----------------------------------------------------------------------------- families

def cut_paste(rng: np.random.Generator, image: np.ndarray, source: np.ndarray,
              region: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """A rotated rectangular patch of the donor pasted on the image (CutPaste)."""
    h, w = region.shape
    side = min(h, w)
    mask = rotated_rectangle(region.shape, _centre_in(rng, region), rng.uniform(0.1, 0.3) * side,
                             rng.uniform(0.06, 0.2) * side, rng.uniform(0, 180)) & region
    return _apply(image, _shifted(rng, source), mask)


def scar(rng: np.random.Generator, image: np.ndarray, source: np.ndarray,
         region: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """A thin, long rotated strip of the donor (CutPaste "scar")."""
    side = min(region.shape)
    mask = rotated_rectangle(region.shape, _centre_in(rng, region), rng.uniform(0.12, 0.3) * side,
                             rng.uniform(2, 6), rng.uniform(0, 180)) & region
    return _apply(image, _shifted(rng, source), mask)


def perlin_texture(rng: np.random.Generator, image: np.ndarray, source: np.ndarray,
                   region: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """A Perlin-shaped region blended with the donor image as texture (DRAEM-style)."""
    mask = perlin_mask(rng, region.shape) & region
    opacity = rng.uniform(0.5, 1.0)
    return _apply(image, (1 - opacity) * image + opacity * _shifted(rng, source), mask)


def local_corruption(rng: np.random.Generator, image: np.ndarray, source: np.ndarray,
                     region: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """An elliptical region locally warped (swirl), blurred or colour-shifted (the donor is unused)."""
    h, w = region.shape
    centre = _centre_in(rng, region)
    radii = rng.uniform(0.04, 0.12, 2) * min(h, w)
    rr, cc = draw.ellipse(centre[0], centre[1], radii[0], radii[1], shape=region.shape,
                          rotation=rng.uniform(0, np.pi))
    mask = np.zeros(region.shape, dtype=bool)
    mask[rr, cc] = True
    mask &= region
    kind = rng.integers(3)
    if kind == 0:
        changed = transform.swirl(image, center=(centre[1], centre[0]), strength=rng.uniform(3, 8),
                                  radius=float(radii.max()) * 1.5, mode="reflect")
    elif kind == 1:
        changed = ndimage.gaussian_filter(image, sigma=(rng.uniform(2, 4),) * 2 + (0,))
    else:
        changed = image + rng.choice([-1, 1], 3) * rng.uniform(0.1, 0.3, 3)
    return _apply(image, changed, mask)


DEFECT_FAMILIES: Dict[str, DefectFn] = {
    "cut_paste": cut_paste, "scar": scar, "perlin_texture": perlin_texture, "local_corruption": local_corruption,
}
"""Family name -> defect function."""


def synthesize_anomaly(rng: np.random.Generator, image: np.ndarray, source: np.ndarray,
                       families: Sequence[str] = tuple(DEFECT_FAMILIES), use_foreground: bool = True,
                       attempts: int = 20) -> "tuple[np.ndarray, np.ndarray]":
    """One defect of a random family among ``families`` in ``image``: (defective image, mask).

    The defect goes on the foreground estimate when there is one; shapes are
    redrawn until the mask covers a sensible part of the image (at least a few pixels).
    """
    region = defect_region(image, use_foreground)
    family = DEFECT_FAMILIES[families[int(rng.integers(len(families)))]]
    best = None
    for _ in range(attempts):
        out, mask = family(rng, image, source, region)
        if MIN_AREA_FRACTION <= mask.mean() <= MAX_AREA_FRACTION:
            return out, mask
        if mask.any() and (best is None or mask.sum() > best[1].sum()):
            best = (out, mask)
    if best is None:
        raise RuntimeError("could not place a defect: the defect region is empty")
    return best
