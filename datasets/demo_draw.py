"""Procedural drawing of the synthetic demo classes and of their defects (no file I/O).

Every class is a function ``(rng) -> (image, foreground)`` returning a float
RGB image in [0, 1] of shape (SIZE, SIZE, 3) and, for objects, the boolean
mask of the object (None for textures). Normal images of a class differ by a
small shift, rotation, phase, colour jitter and noise. Defects are strong,
local and high-contrast, each covering 1-10 % of the image, so that a
pretrained CNN comparing against a few normal references can find them.

Everything is vectorised numpy (shapes from signed distances, analytic
anti-aliasing), PIL ImageDraw for lines and scipy.ndimage for distances.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 256
MIN_DEFECT_FRACTION, MAX_DEFECT_FRACTION = 0.01, 0.10
UNSEEN_STRENGTH = (0.15, 0.35)
"""Opacity range of the unseen classes' defects: faint, so that the demo does not saturate."""
UNSEEN_MAX_FRACTION = 0.03
"""Largest area of an unseen class's defect (1-3 % of the image)."""
NOISE_STD = 0.015

Rendered = tuple[np.ndarray, Optional[np.ndarray]]
"""(image float32 HxWx3 in [0, 1], object mask bool HxW or None for textures)."""

_XX, _YY = np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32))
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_STAIN_COLOURS = np.array([(0.85, 0.10, 0.10), (0.10, 0.25, 0.90), (0.10, 0.70, 0.15),
                           (0.95, 0.80, 0.05), (0.60, 0.10, 0.70)], dtype=np.float32)


# ----------------------------------------------------------------------------- helpers

def _jitter(rng: np.random.Generator, colour, amount: float = 0.04) -> np.ndarray:
    """``colour`` plus a uniform random offset per channel, kept in [0, 1]."""
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1).astype(np.float32)


def _blend(low: np.ndarray, high: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-pixel linear interpolation from ``low`` to ``high`` (colours or images)."""
    return low + (high - low) * weight[..., None]


def _rotated(cx: float, cy: float, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a frame centred on (cx, cy) and rotated by ``degrees``."""
    angle = np.deg2rad(degrees)
    dx, dy = _XX - cx, _YY - cy
    return (dx * np.cos(angle) + dy * np.sin(angle)).astype(np.float32), \
           (-dx * np.sin(angle) + dy * np.cos(angle)).astype(np.float32)


def _coverage(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-ness in [0, 1] of a signed distance (negative inside)."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, cell: int) -> np.ndarray:
    """Smooth random field of unit standard deviation with features about ``cell`` pixels."""
    coarse = rng.standard_normal((SIZE // cell + 1,) * 2).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _lit(rng: np.random.Generator, image: np.ndarray, amount: float = 0.04) -> np.ndarray:
    """``image`` under a slowly varying illumination."""
    return image * (1.0 + amount * _smooth_noise(rng, 64))[..., None]


def _background(rng: np.random.Generator, colour) -> np.ndarray:
    """A plain, softly lit background of about ``colour``."""
    return _lit(rng, np.broadcast_to(_jitter(rng, colour, 0.03), (SIZE, SIZE, 3)), 0.05)


# ----------------------------------------------------------------------------- textures

def _stripes(rng: np.random.Generator) -> Rendered:
    """Diagonal navy / cream stripes."""
    u, _ = _rotated(0, 0, 35 + rng.uniform(-3, 3))
    wave = np.sin(2 * np.pi * u / (22 * rng.uniform(0.95, 1.05)) + rng.uniform(0, 2 * np.pi))
    image = _blend(_jitter(rng, (0.15, 0.20, 0.45)), _jitter(rng, (0.90, 0.85, 0.70)),
                   np.clip(0.5 + 1.5 * wave, 0, 1))
    return _lit(rng, image), None


def _checker(rng: np.random.Generator) -> Rendered:
    """Green / grey checkerboard, slightly rotated."""
    u, v = _rotated(rng.uniform(0, 64), rng.uniform(0, 64), rng.uniform(-3, 3))
    cell = 32 * rng.uniform(0.97, 1.03)
    parity = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    image = _blend(_jitter(rng, (0.10, 0.35, 0.20)), _jitter(rng, (0.80, 0.80, 0.75)),
                   ndimage.gaussian_filter(parity, 0.7))
    return _lit(rng, image), None


def _marble(rng: np.random.Generator) -> Rendered:
    """Pale marble with turbulent grey veins."""
    turbulence = _smooth_noise(rng, 48) + 0.5 * _smooth_noise(rng, 16)
    veins = np.abs(np.sin((0.8 * _XX + 0.6 * _YY) / 20 + 2.0 * turbulence + rng.uniform(0, 2 * np.pi)))
    image = _blend(_jitter(rng, (0.45, 0.42, 0.45)), _jitter(rng, (0.92, 0.88, 0.85)), veins ** 0.35)
    return _lit(rng, image), None


def _weave(rng: np.random.Generator) -> Rendered:
    """Basket weave: beige warp and brown weft threads alternating over and under."""
    pitch = 16 * rng.uniform(0.97, 1.03)
    x, y = (_XX + rng.uniform(0, 2 * pitch)) / pitch, (_YY + rng.uniform(0, 2 * pitch)) / pitch
    warp_on_top = ((np.floor(x) + np.floor(y)) % 2) == 0
    profile = np.where(warp_on_top, np.sin(np.pi * (x % 1)), np.sin(np.pi * (y % 1))) ** 0.6
    colour = np.where(warp_on_top[..., None], _jitter(rng, (0.80, 0.70, 0.50)),
                      _jitter(rng, (0.55, 0.35, 0.20)))
    return _lit(rng, colour * (0.35 + 0.65 * profile[..., None])), None


def _dots(rng: np.random.Generator) -> Rendered:
    """Orange dots on a hexagonal lattice over pale yellow."""
    pitch, radius = 28 * rng.uniform(0.97, 1.03), 8 * rng.uniform(0.95, 1.05)
    y = _YY + rng.uniform(0, pitch)
    x = _XX + rng.uniform(0, pitch) + (np.floor(y / pitch) % 2) * pitch / 2
    distance = np.hypot(x % pitch - pitch / 2, y % pitch - pitch / 2)
    image = _blend(_jitter(rng, (0.95, 0.92, 0.70)), _jitter(rng, (0.90, 0.45, 0.10)),
                   _coverage(distance - radius))
    return _lit(rng, image), None


# ----------------------------------------------------------------------------- objects

def _object_centre(rng: np.random.Generator, shift: float) -> tuple[float, float]:
    return SIZE / 2 + rng.uniform(-shift, shift), SIZE / 2 + rng.uniform(-shift, shift)


def _nut(rng: np.random.Generator) -> Rendered:
    """A steel hexagon nut with a threaded hole, on dark slate."""
    u, v = _rotated(*_object_centre(rng, 8), rng.uniform(-6, 6))
    apothem, hole = 78 * rng.uniform(0.97, 1.03), 30.0
    hexagon = np.maximum(np.abs(u), np.maximum(np.abs(0.5 * u + 0.866 * v),
                                               np.abs(0.5 * u - 0.866 * v))) - apothem
    radius = np.hypot(u, v)
    coverage = _coverage(np.maximum(hexagon, hole - radius))
    shade = 0.75 - 0.15 * (u + v) / apothem
    shade = shade * np.where(hexagon > -7, 0.75, 1.0) * np.where(radius < hole + 8,
                                                                 0.8 + 0.1 * np.sin(2.5 * radius), 1.0)
    metal = _jitter(rng, (0.72, 0.74, 0.78), 0.03) * shade[..., None]
    return _blend(_background(rng, (0.20, 0.22, 0.26)), metal, coverage), coverage > 0.5


def _pill(rng: np.random.Generator) -> Rendered:
    """A red-and-white capsule with cylindrical shading, on light blue-grey."""
    u, v = _rotated(*_object_centre(rng, 6), rng.uniform(-5, 5))
    length, width = 160 * rng.uniform(0.98, 1.02), 70.0
    straight = length / 2 - width / 2
    coverage = _coverage(np.hypot(np.maximum(np.abs(u) - straight, 0), v) - width / 2)
    roundness = np.sqrt(np.clip(1 - (v / (width / 2)) ** 2, 0, 1))
    shade = (0.6 + 0.4 * roundness) * np.where(np.abs(u) < 1.5, 0.6, 1.0)
    shell = np.where((u < 0)[..., None], _jitter(rng, (0.80, 0.12, 0.12), 0.03),
                     _jitter(rng, (0.95, 0.95, 0.92), 0.03)) * shade[..., None]
    return _blend(_background(rng, (0.65, 0.72, 0.80)), shell, coverage), coverage > 0.5


def _chip(rng: np.random.Generator) -> Rendered:
    """A black integrated circuit with silver pins on two sides, on a green board."""
    u, v = _rotated(*_object_centre(rng, 6), rng.uniform(-3, 3))
    half, pin_length, pins = 52.0, 16.0, 6
    pitch = 2 * half / pins
    pin_centre = -half + pitch * (np.clip(np.floor((v + half) / pitch), 0, pins - 1) + 0.5)
    pin = np.maximum(np.abs(v - pin_centre) - 4.5, np.abs(np.abs(u) - half - pin_length / 2)
                     - pin_length / 2)
    body = np.maximum(np.abs(u), np.abs(v)) - half
    dot = np.hypot(u + half - 14, v + half - 14) - 5
    board = _background(rng, (0.10, 0.40, 0.20))
    board = _blend(board, board * 1.25, ((_YY % 20) < 3).astype(np.float32))
    image = _blend(board, _jitter(rng, (0.78, 0.78, 0.80), 0.03), _coverage(pin))
    image = _blend(image, _jitter(rng, (0.12, 0.12, 0.13), 0.02), _coverage(body))
    image = _blend(image, np.float32([0.45, 0.45, 0.47]), _coverage(dot))
    return image, np.minimum(body, pin) < 0


# ----------------------------------------------------------------------------- defects

def _line_mask(points: list[tuple[float, float]], width: int) -> np.ndarray:
    canvas = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    return np.asarray(canvas) > 0


def _blob_mask(rng: np.random.Generator, centre, radius: float, roughness: float) -> np.ndarray:
    """An irregular blob: a randomly stretched disc with a noisy border."""
    u, v = _rotated(centre[0], centre[1], rng.uniform(0, 180))
    stretch = rng.uniform(0.7, 1.3)
    distance = np.hypot(u / (radius * stretch), v * stretch / radius)
    return (1 - distance + roughness * _smooth_noise(rng, 8)) > 0


def _scratch(rng: np.random.Generator, centre) -> np.ndarray:
    angle, length = rng.uniform(0, np.pi), rng.uniform(120, 200)
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    return _line_mask([(centre[0] - dx, centre[1] - dy), (centre[0] + dx, centre[1] + dy)],
                      int(rng.integers(6, 11)))


def _crack(rng: np.random.Generator, centre) -> np.ndarray:
    heading, step = rng.uniform(0, 2 * np.pi), rng.uniform(16, 24)
    points = [(float(centre[0]), float(centre[1]))]
    for _ in range(10):
        heading += rng.uniform(-0.7, 0.7)
        points.append((points[-1][0] + step * np.cos(heading), points[-1][1] + step * np.sin(heading)))
    offset = np.subtract(points[len(points) // 2], centre)  # centre the polyline on ``centre``
    return _line_mask([(x - offset[0], y - offset[1]) for x, y in points], int(rng.integers(5, 8)))


def _stain(rng: np.random.Generator, centre) -> np.ndarray:
    return _blob_mask(rng, centre, rng.uniform(16, 30), 0.25)


def _hole(rng: np.random.Generator, centre) -> np.ndarray:
    return _blob_mask(rng, centre, rng.uniform(14, 26), 0.12)


def _contamination(rng: np.random.Generator, centre) -> np.ndarray:
    return _blob_mask(rng, centre, rng.uniform(18, 32), 0.35)


def _contrasting_grey(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """Near-black on bright surroundings, near-white on dark ones."""
    level = rng.uniform(0.02, 0.12) if mean @ _LUMA > 0.45 else rng.uniform(0.88, 1.0)
    return _jitter(rng, (level, level, level), 0.03)


def _farthest_colour(mean: np.ndarray) -> np.ndarray:
    """The saturated stain colour most different from ``mean``."""
    return _STAIN_COLOURS[np.argmax(np.linalg.norm(_STAIN_COLOURS - mean, axis=1))]


def _defect_look(rng: np.random.Generator, kind: str, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What the pixels of a defect of ``kind`` look like (a full image; only ``mask`` is used)."""
    mean = image[mask].mean(axis=0)
    if kind == "stain":
        return 0.15 * image + 0.85 * _farthest_colour(mean)
    if kind == "contamination":
        grain = ndimage.gaussian_filter(rng.random((SIZE, SIZE)).astype(np.float32), 1.0)
        return _farthest_colour(mean) * (0.4 + 1.2 * grain[..., None])
    return np.broadcast_to(_contrasting_grey(rng, mean), image.shape)  # scratch, crack, hole


DEFECT_SHAPES: dict[str, Callable[[np.random.Generator, tuple[float, float]], np.ndarray]] = {
    "scratch": _scratch, "crack": _crack, "stain": _stain, "hole": _hole,
    "contamination": _contamination,
}
"""Defect type -> function drawing its mask around a centre."""


def _random_centre(rng: np.random.Generator, candidates: Optional[np.ndarray]) -> tuple[float, float]:
    """A defect centre: anywhere on a texture (``candidates`` None), else one of the (y, x) rows."""
    if candidates is None:
        x, y = rng.uniform(56, SIZE - 56, 2)
        return float(x), float(y)
    y, x = candidates[rng.integers(len(candidates))]
    return float(x), float(y)


def add_defect(rng: np.random.Generator, image: np.ndarray, foreground: Optional[np.ndarray],
               kind: str, strength: float = 1.0, max_fraction: float = MAX_DEFECT_FRACTION
               ) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect of ``kind`` into a copy of ``image``; return (image, its exact mask).

    On an object the defect is centred well inside the object and confined to
    it. Shapes are redrawn until the defect covers 1 % to ``max_fraction`` of the
    image. ``strength`` < 1 blends the defect's look with the image (subtler).
    """
    candidates = None
    if foreground is not None:
        candidates = np.argwhere(ndimage.distance_transform_edt(foreground) >= 12)
    for _ in range(50):
        mask = DEFECT_SHAPES[kind](rng, _random_centre(rng, candidates))
        if foreground is not None:
            mask &= foreground
        if MIN_DEFECT_FRACTION <= mask.mean() <= max_fraction:
            break
    defective = image.copy()
    defective[mask] = (image + strength * (_defect_look(rng, kind, image, mask) - image))[mask]
    return defective, mask


# ----------------------------------------------------------------------------- classes

@dataclass(frozen=True)
class DemoClass:
    """A synthetic class: how to draw a normal image, and which defects it gets."""

    render: Callable[[np.random.Generator], Rendered]
    defects: tuple[str, ...]
    strength: tuple[float, float] = (1.0, 1.0)
    """Range of the defect opacity: below 1 the defect is blended into the image (harder to see)."""
    max_fraction: float = MAX_DEFECT_FRACTION


DEMO_CLASSES: dict[str, DemoClass] = {
    "stripes": DemoClass(_stripes, ("scratch", "stain", "crack")),
    "checker": DemoClass(_checker, ("hole", "contamination")),
    "marble": DemoClass(_marble, ("crack", "stain", "contamination")),
    "nut": DemoClass(_nut, ("scratch", "hole")),
    "pill": DemoClass(_pill, ("stain", "crack", "contamination")),
    # The unseen classes get small, faint defects, so that the demo's score is not saturated.
    "weave": DemoClass(_weave, ("hole", "scratch", "contamination"), UNSEEN_STRENGTH, UNSEEN_MAX_FRACTION),
    "dots": DemoClass(_dots, ("stain", "crack"), UNSEEN_STRENGTH, UNSEEN_MAX_FRACTION),
    "chip": DemoClass(_chip, ("scratch", "hole", "contamination"), UNSEEN_STRENGTH, UNSEEN_MAX_FRACTION),
}


def to_uint8(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Add sensor noise and quantize a float image to 8-bit RGB."""
    noisy = image + NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
    return np.rint(np.clip(noisy, 0, 1) * 255).astype(np.uint8)
