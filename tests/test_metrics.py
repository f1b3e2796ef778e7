"""Tests for utils.metrics against independent references.

Pixel AUC/AP/F1 and the image metrics are compared with scikit-learn; AUPRO is
compared with a slow reference written here that loops over every distinct
threshold and labels the regions with scikit-image.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from skimage.measure import label as skimage_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from utils.metrics import (
    METRIC_NAMES,
    PixelCurve,
    aupro,
    compute_metrics,
    f1_max,
    image_metrics,
    label_regions,
    pixel_curve,
    pixel_metrics,
    trapezoid_up_to,
)


# --------------------------------------------------------------------------- #
# Independent references
# --------------------------------------------------------------------------- #
def sklearn_f1_max(y_true: np.ndarray, y_score: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Slow, literal AUPRO: one binarisation per distinct score."""
    masks = masks.astype(bool)
    regions = []  # flat pixel indices of each connected component
    for image_index, mask in enumerate(masks):
        labelled = skimage_label(mask, connectivity=2)
        for region in range(1, labelled.max() + 1):
            rows, cols = np.nonzero(labelled == region)
            regions.append(np.ravel_multi_index((np.full_like(rows, image_index), rows, cols), masks.shape))
    flat = maps.ravel()
    normal = ~masks.ravel()
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(flat)[::-1]:
        binary = flat >= threshold
        fprs.append(np.count_nonzero(binary & normal) / np.count_nonzero(normal))
        pros.append(np.mean([np.count_nonzero(binary[idx]) / idx.size for idx in regions]))
    fprs, pros = np.array(fprs), np.array(pros)

    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < fpr_limit:
        j = int(np.argmax(fprs > fpr_limit))  # first vertex past the limit
        slope = (pros[j] - pros[j - 1]) / (fprs[j] - fprs[j - 1])
        x.append(fpr_limit)
        y.append(pros[j - 1] + slope * (fpr_limit - fprs[j - 1]))
    area = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))
    return area / fpr_limit


def random_masks(rng: np.random.Generator, num_images: int = 6, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few rectangles and scattered pixels; the first two images are normal."""
    masks = np.zeros((num_images, size, size), dtype=bool)
    for mask in masks[2:]:
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, 7, size=2)
            mask[r : r + h, c : c + w] = True
        mask |= rng.random((size, size)) < 0.02  # tiny regions, some touching diagonally
    labels = masks.reshape(num_images, -1).any(axis=1).astype(int)
    return masks, labels


def random_maps(rng: np.random.Generator, masks: np.ndarray, decimals: int | None) -> np.ndarray:
    """Noisy maps that are higher on the masks; optionally rounded to create ties."""
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(np.float32)


# --------------------------------------------------------------------------- #
# Pixel and image metrics against scikit-learn
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 2, 1, 0])
def test_pixel_metrics_match_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    gt = rng.random((4, 30, 30)) < 0.15
    scores = rng.random(gt.shape) + 0.4 * gt
    if decimals is not None:  # rounding creates many tied scores
        scores = np.round(scores, decimals)
    scores = scores.astype(np.float32)

    result = pixel_metrics(scores, gt)

    y_true, y_score = gt.ravel(), scores.ravel()
    assert result["Pixel AUC"] == pytest.approx(roc_auc_score(y_true, y_score), abs=1e-9)
    assert result["Pixel AP"] == pytest.approx(average_precision_score(y_true, y_score), abs=1e-9)
    assert result["Pixel F1"] == pytest.approx(sklearn_f1_max(y_true, y_score), abs=1e-9)
    assert math.isnan(result["Pixel AUPRO"])  # no region ids given


def test_pixel_metrics_handle_infinite_and_float64_scores():
    rng = np.random.default_rng(3)
    gt = rng.random(500) < 0.2
    scores = rng.random(500)
    scores[:5] = np.inf
    scores[5:10] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pixel_metrics(scores, gt)
    # scikit-learn rejects infinities; finite stand-ins keep the same ranking.
    finite = np.clip(scores, -10.0, 10.0)
    assert result["Pixel AUC"] == pytest.approx(roc_auc_score(gt, finite), abs=1e-12)
    assert result["Pixel AP"] == pytest.approx(average_precision_score(gt, finite), abs=1e-12)
    assert result["Pixel F1"] == pytest.approx(sklearn_f1_max(gt, finite), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_compute_metrics_matches_sklearn_and_pixel_metrics(seed):
    rng = np.random.default_rng(seed)
    masks, labels = random_masks(rng, num_images=10)
    maps = random_maps(rng, masks, decimals=2)

    result = compute_metrics(maps, labels, masks)

    assert tuple(result) == METRIC_NAMES
    assert all(type(value) is float for value in result.values())
    image_scores = maps.max(axis=(1, 2))
    assert result["Image AUC"] == pytest.approx(roc_auc_score(labels, image_scores), abs=1e-12)
    assert result["Image AP"] == pytest.approx(average_precision_score(labels, image_scores), abs=1e-12)
    assert result["Image F1"] == pytest.approx(sklearn_f1_max(labels, image_scores), abs=1e-12)
    assert result["Pixel AUC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert result["Pixel AP"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert result["Pixel F1"] == pytest.approx(sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-9)
    assert result["Pixel AUPRO"] == pytest.approx(reference_aupro(maps, masks), abs=1e-9)

    direct = pixel_metrics(maps, masks, label_regions(masks))
    for name, value in direct.items():
        assert result[name] == pytest.approx(value, abs=1e-15)


def test_explicit_image_scores_are_used():
    rng = np.random.default_rng(4)
    masks, labels = random_masks(rng, num_images=8)
    maps = random_maps(rng, masks, decimals=None)
    image_scores = rng.random(8)
    result = compute_metrics(maps, labels, masks, image_scores=image_scores, compute_aupro=False)
    assert result["Image AUC"] == pytest.approx(roc_auc_score(labels, image_scores), abs=1e-12)
    assert result["Image AP"] == pytest.approx(average_precision_score(labels, image_scores), abs=1e-12)
    assert result["Image F1"] == pytest.approx(sklearn_f1_max(labels, image_scores), abs=1e-12)
    assert math.isnan(result["Pixel AUPRO"])
    assert not math.isnan(result["Pixel AUC"])


def test_image_metrics_with_ties():
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.5, 0.1, 0.2, 0.9])
    result = image_metrics(labels, scores)
    assert result["Image AUC"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["Image AP"] == pytest.approx(average_precision_score(labels, scores))
    assert result["Image F1"] == pytest.approx(sklearn_f1_max(labels, scores))


# --------------------------------------------------------------------------- #
# AUPRO
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("decimals", [None, 1])
def test_aupro_matches_reference(seed, decimals):
    rng = np.random.default_rng(seed)
    masks, _ = random_masks(rng)
    maps = random_maps(rng, masks, decimals)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_other_fpr_limits_match_reference(fpr_limit):
    rng = np.random.default_rng(5)
    masks, _ = random_masks(rng)
    maps = random_maps(rng, masks, decimals=1)
    expected = reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_of_perfect_map_is_one():
    masks, _ = random_masks(np.random.default_rng(6))
    perfect = masks.astype(np.float32)
    value = aupro(perfect, masks)
    assert value == pytest.approx(1.0, abs=1e-12)
    assert value <= 1.0
    # Perfect but noisy ordering: anomalous pixels strictly above all normal ones.
    rng = np.random.default_rng(7)
    separated = np.where(masks, 2.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert 1.0 - 1e-12 <= aupro(separated, masks) <= 1.0


def test_aupro_never_exceeds_one_with_many_regions():
    # Many one-pixel regions make the PRO weights 1/(R * 1) sum with round-off.
    rng = np.random.default_rng(8)
    masks = rng.random((3, 40, 40)) < 0.3
    maps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    curve = pixel_curve(maps, masks, label_regions(masks))
    assert curve.pro.max() <= 1.0
    assert 0.0 <= curve.aupro() <= 1.0


def test_aupro_of_inverted_map_is_zero():
    masks, _ = random_masks(np.random.default_rng(9))
    inverted = 1.0 - masks.astype(np.float32)
    assert aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_of_constant_map_matches_reference():
    masks, _ = random_masks(np.random.default_rng(10))
    constant = np.full(masks.shape, 0.5, dtype=np.float32)
    value = aupro(constant, masks)
    # One threshold: the curve jumps from (0, 0) to (1, 1); area to 0.3 is 0.045.
    assert value == pytest.approx(reference_aupro(constant, masks), abs=1e-12)
    assert value == pytest.approx(0.15, abs=1e-12)
    assert pixel_metrics(constant, masks)["Pixel AUC"] == pytest.approx(0.5)


def test_aupro_uses_region_ids_when_given():
    # Two regions of very different size: PRO averages per region, not per pixel.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, :4, :4] = True  # 16 pixels, all detected
    masks[0, 8, 8] = True  # 1 pixel, missed
    maps = masks.astype(np.float32)
    maps[0, 8, 8] = 0.0
    # Detecting the big region alone gives PRO 0.5 at FPR 0 ...
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-12)
    # ... while declaring both one region (per-pixel overlap) changes the value.
    one_region = masks.astype(np.int32)
    assert aupro(maps, masks, region_ids=one_region) != pytest.approx(aupro(maps, masks))


# --------------------------------------------------------------------------- #
# Region labelling
# --------------------------------------------------------------------------- #
def test_label_regions_uses_8_connectivity():
    mask = np.zeros((1, 5, 5), dtype=bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True  # touching only at a corner
    mask[0, 4, 0] = True  # isolated
    region_ids = label_regions(mask)
    assert region_ids[0, 1, 1] == region_ids[0, 2, 2] != 0
    assert region_ids[0, 4, 0] not in (0, region_ids[0, 1, 1])
    assert len(np.unique(region_ids[mask])) == 2
    assert np.all(region_ids[~mask] == 0)


def test_label_regions_are_unique_across_images():
    masks = np.zeros((3, 4, 4), dtype=np.uint8)
    masks[0, 0, 0] = 1
    masks[1] = 1  # same location in the next image must not merge with image 0
    masks[2, 3, 3] = 1
    region_ids = label_regions(masks)
    assert region_ids.shape == masks.shape
    assert np.issubdtype(region_ids.dtype, np.integer)
    assert sorted(np.unique(region_ids)) == [0, 1, 2, 3]
    assert region_ids[0, 0, 0] != region_ids[1, 0, 0]
    assert len(np.unique(region_ids[1])) == 1


def test_label_regions_single_image():
    mask = np.eye(4, dtype=bool) | np.eye(4, dtype=bool)[::-1]
    assert label_regions(mask).max() == 1


# --------------------------------------------------------------------------- #
# Undefined metrics and input checking
# --------------------------------------------------------------------------- #
def _assert_all_nan(result, names):
    for name in names:
        assert math.isnan(result[name]), name


IMAGE_NAMES = METRIC_NAMES[:3]
PIXEL_NAMES = METRIC_NAMES[3:]


def test_all_normal_data_gives_nan_without_warnings():
    rng = np.random.default_rng(11)
    maps = rng.random((4, 8, 8)).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(maps, np.zeros(4, dtype=int), masks)
    assert tuple(result) == METRIC_NAMES
    _assert_all_nan(result, METRIC_NAMES)


def test_all_anomalous_data_gives_nan():
    rng = np.random.default_rng(12)
    maps = rng.random((3, 8, 8)).astype(np.float32)
    masks = np.ones(maps.shape, dtype=bool)  # no normal pixels, no normal images
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(maps, np.ones(3, dtype=int), masks)
    _assert_all_nan(result, METRIC_NAMES)


def test_single_class_labels_but_defined_pixels():
    rng = np.random.default_rng(13)
    masks, _ = random_masks(rng)
    maps = random_maps(rng, masks, decimals=None)
    result = compute_metrics(maps, np.ones(len(maps), dtype=int), masks)
    _assert_all_nan(result, IMAGE_NAMES)
    assert all(0.0 <= result[name] <= 1.0 for name in PIXEL_NAMES)


def test_empty_input_gives_nan():
    result = compute_metrics(np.zeros((0, 8, 8), np.float32), np.zeros(0), np.zeros((0, 8, 8), bool))
    _assert_all_nan(result, METRIC_NAMES)


def test_compute_aupro_false_skips_aupro():
    rng = np.random.default_rng(14)
    masks, labels = random_masks(rng)
    maps = random_maps(rng, masks, decimals=None)
    result = compute_metrics(maps, labels, masks, compute_aupro=False)
    assert math.isnan(result["Pixel AUPRO"])
    assert result["Pixel AUC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_invalid_inputs_raise():
    maps = np.zeros((2, 4, 4), np.float32)
    masks = np.zeros((2, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(maps, np.zeros(2), masks[:, :3])
    with pytest.raises(ValueError, match="labels"):
        compute_metrics(maps, np.zeros(3), masks)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        compute_metrics(maps, np.array([0, 2]), masks)
    with pytest.raises(ValueError, match="pro_fpr_limit"):
        compute_metrics(maps, np.zeros(2), masks, pro_fpr_limit=0.0)
    nan_maps = maps.copy()
    nan_maps[0, 0, 0] = np.nan
    masks[1, 0, 0] = True
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(nan_maps, masks)
    with pytest.raises(ValueError, match="positive"):
        pixel_curve(maps, masks, np.zeros(masks.shape, np.int32))


def test_aupro_requires_region_ids_on_curve():
    rng = np.random.default_rng(15)
    gt = rng.random(100) < 0.3
    curve = pixel_curve(rng.random(100), gt)
    assert isinstance(curve, PixelCurve) and curve.pro is None
    with pytest.raises(ValueError, match="region ids"):
        curve.aupro()


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def test_trapezoid_up_to_interpolates_at_the_limit():
    x = np.array([0.0, 0.2, 0.2, 0.6, 1.0])
    y = np.array([0.0, 0.4, 0.6, 1.0, 1.0])
    # 0..0.2: triangle 0.04; vertical step; 0.2..0.3: y from 0.6 to 0.7 -> 0.065.
    assert trapezoid_up_to(x, y, 0.3) == pytest.approx(0.105)
    assert trapezoid_up_to(x, y, 0.2) == pytest.approx(0.04)
    assert trapezoid_up_to(x, y, 1.0) == pytest.approx(np.trapezoid(y, x))
    assert trapezoid_up_to(x, y, 2.0) == pytest.approx(np.trapezoid(y, x))


def test_f1_max_ignores_undefined_points():
    assert f1_max([0.0, 0.5, 1.0], [0.0, 1.0, 0.5]) == pytest.approx(2 / 3)
    assert math.isnan(f1_max([0.0], [0.0]))
    assert f1_max([np.nan, 0.5], [1.0, 0.5]) == pytest.approx(0.5)
