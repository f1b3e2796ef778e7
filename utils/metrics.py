"""Image- and pixel-level anomaly-detection metrics for one class.

The entry point is :func:`compute_metrics`, which turns the anomaly maps of one
class (plus image labels and ground-truth masks) into the seven numbers listed
in :data:`METRIC_NAMES`.

Image metrics are computed with scikit-learn: there are only a few thousand
images, so speed does not matter there.

Pixel metrics are where the time goes: a class can hold 100M pixels and
scikit-learn needs several float64 copies and sorts of them per metric.  Here
every pixel metric -- ROC AUC, average precision, F1-max and the exact AUPRO --
is read off ONE shared :class:`PixelCurve`, built as follows:

1. Sort all pixel scores once (values only, no index array: NumPy's SIMD sort
   of float32 values is about three times faster than ``argsort``, and the
   sorted copy is the only array as large as the input that is allocated).
2. Sort the anomalous pixels' scores (a few percent of all pixels), carrying
   their region ids along.
3. For every distinct score ``t`` of an anomalous pixel, binary searches in
   both sorted arrays give the counts of normal and anomalous pixels with
   scores ``>= t`` and ``> t``.

These points are exactly the vertices of the full threshold curve: between two
consecutive distinct anomalous scores only normal pixels are crossed, so the
true positives (and the per-region overlap) stay constant and every threshold
in between lies on a straight horizontal segment.  Dropping such collinear
points changes neither a trapezoidal area, nor a linear interpolation, nor the
step-wise average precision, nor the F1-max, so the results equal those of
scikit-learn (which evaluates every distinct score, ties grouped) up to float
round-off -- while the work after the sort is proportional to the number of
anomalous pixels only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = [
    "METRIC_NAMES",
    "PixelCurve",
    "aupro",
    "compute_metrics",
    "f1_max",
    "image_metrics",
    "label_regions",
    "pixel_curve",
    "pixel_metrics",
    "trapezoid_up_to",
]

#: Keys of the dict returned by :func:`compute_metrics`, in CSV column order.
METRIC_NAMES: tuple[str, ...] = (
    "Image AUC",
    "Image AP",
    "Image F1",
    "Pixel AUC",
    "Pixel AP",
    "Pixel F1",
    "Pixel AUPRO",
)

_NAN = float("nan")


# --------------------------------------------------------------------------- #
# Small building blocks
# --------------------------------------------------------------------------- #
def label_regions(masks: np.ndarray) -> np.ndarray:
    """Label the connected components of each ground-truth mask.

    Connectivity is 8-neighbourhood within an image (a 3x3 structuring element
    of ones, as in the official MVTec AD evaluation); pixels of different images
    are never connected.

    Args:
        masks: ``(H, W)`` or ``(N, H, W)`` array; non-zero pixels are anomalous.

    Returns:
        ``int32`` array of the same shape: 0 on the background, ``1..R`` on the
        ``R`` regions, numbered uniquely across all images.
    """
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"masks must have at least 2 dimensions (H, W), got shape {masks.shape}")
    # A 3x3 block of ones in the last two axes, nothing along the leading ones,
    # so one call labels the whole stack while keeping the images apart.
    structure = np.zeros((3,) * masks.ndim, dtype=bool)
    structure[(1,) * (masks.ndim - 2)] = True
    region_ids, _ = ndimage.label(masks.astype(bool, copy=False), structure=structure)
    return region_ids


def f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    """Largest F1 score ``2PR / (P + R)`` along a precision-recall curve.

    Points where the F1 score is not finite (``P + R == 0``, NaN inputs) are
    ignored; ``nan`` is returned when no point is left.
    """
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2.0 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]
    return float(f1.max()) if f1.size else _NAN


def trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under the polyline ``(x, y)`` from ``x[0]`` to ``x_max``.

    ``x`` must be non-decreasing (repeated values, i.e. vertical steps, are
    allowed).  When ``x_max`` falls strictly between two vertices, the curve is
    linearly interpolated there; when it lies beyond the last vertex, the area
    stops at the last vertex.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of equal length, got {x.shape} and {y.shape}")
    # Vertices at or left of x_max; everything right of it is cut off.
    end = int(np.searchsorted(x, x_max, side="right"))
    if end == 0:
        return 0.0
    area = float(np.trapezoid(y[:end], x[:end]))
    if end < x.size and x[end - 1] < x_max:
        # Here x[end - 1] < x_max < x[end], so the slope is well defined.
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_cut) / 2.0
    return area


def _interleave(first: float, above: np.ndarray, at: np.ndarray, last: float) -> np.ndarray:
    """Polyline ``[first, above[0], at[0], above[1], at[1], ..., last]`` (float64)."""
    out = np.empty(2 * at.size + 2, dtype=np.float64)
    out[0] = first
    out[1:-1:2] = above
    out[2:-1:2] = at
    out[-1] = last
    return out


# --------------------------------------------------------------------------- #
# The shared pixel-level threshold curve
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PixelCurve:
    """Pixel-level operating points, one per distinct anomalous-pixel score.

    For the ``j``-th largest distinct score ``t_j`` among the anomalous pixels:

    * ``tp[j]`` / ``fp[j]``: anomalous / normal pixels with score ``>= t_j``;
    * ``fp_above[j]``: normal pixels with score ``> t_j`` (the anomalous ones
      with score ``> t_j`` are ``tp[j - 1]``, or 0 for ``j = 0``);
    * ``pro[j]``: mean over regions of the fraction of the region's pixels with
      score ``>= t_j`` (``None`` when built without region ids).

    Together with the origin and the all-pixels point ``(num_neg, num_pos)``,
    the points ``(fp_above[j], tp[j-1])`` and ``(fp[j], tp[j])`` are all the
    vertices of the curve traced over every distinct score: the thresholds in
    between only add normal pixels and lie on horizontal segments.

    Build it with :func:`pixel_curve`.  When either class is absent the arrays
    are empty and every metric is ``nan``.
    """

    thresholds: np.ndarray  # distinct anomalous scores, descending
    tp: np.ndarray  # int64
    fp: np.ndarray  # int64
    fp_above: np.ndarray  # int64
    pro: Optional[np.ndarray]  # float64 in [0, 1], or None
    num_pos: int
    num_neg: int

    @property
    def defined(self) -> bool:
        """Whether both normal and anomalous pixels are present."""
        return self.num_pos > 0 and self.num_neg > 0

    def roc_auc(self) -> float:
        """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score``)."""
        if not self.defined:
            return _NAN
        tp_above = np.concatenate(([0], self.tp[:-1]))
        fpr = _interleave(0.0, self.fp_above, self.fp, self.num_neg) / self.num_neg
        tpr = _interleave(0.0, tp_above, self.tp, self.num_pos) / self.num_pos
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Step-wise average precision (equals ``sklearn.metrics.average_precision_score``).

        Recall only grows at the listed thresholds, so the sum of
        ``(R_j - R_{j-1}) * P_j`` over these points is the complete sum.
        """
        if not self.defined:
            return _NAN
        tp = self.tp.astype(np.float64)
        recall_gain = np.diff(self.tp, prepend=0) / self.num_pos
        precision = tp / (tp + self.fp)
        return float(np.dot(recall_gain, precision))

    def f1_max(self) -> float:
        """Largest pixel F1 score over all thresholds.

        With ``P = tp / (tp + fp)`` and ``R = tp / num_pos`` the F1 score is
        ``2 tp / (num_pos + tp + fp)``.  For a fixed ``tp`` it is largest at the
        smallest ``fp``, i.e. at one of the listed thresholds.
        """
        if not self.defined:
            return _NAN
        tp = self.tp.astype(np.float64)
        return float(np.max(2.0 * tp / (self.num_pos + tp + self.fp)))

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Normalised area under the PRO-vs-FPR curve up to ``fpr_limit``.

        The curve starts at ``(0, 0)``, is interpolated linearly at
        ``fpr_limit`` and integrated with the trapezoidal rule; the area is
        divided by ``fpr_limit``, so the result lies in ``[0, 1]``.
        """
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if self.pro is None:
            raise ValueError("this PixelCurve was built without region ids; pass region_ids to pixel_curve")
        if not self.defined:
            return _NAN
        pro_above = np.concatenate(([0.0], self.pro[:-1]))
        fpr = _interleave(0.0, self.fp_above, self.fp, self.num_neg) / self.num_neg
        pro = _interleave(0.0, pro_above, self.pro, self.pro[-1])
        area = trapezoid_up_to(fpr, pro, fpr_limit) / fpr_limit
        return float(min(max(area, 0.0), 1.0))


def _build_curve(scores: np.ndarray, gt: np.ndarray, pos_region_ids: Optional[np.ndarray]) -> PixelCurve:
    """Core of :func:`pixel_curve` on flat arrays.

    Args:
        scores: 1-D numeric scores of all pixels.
        gt: 1-D bool array, True on anomalous pixels.
        pos_region_ids: region id of each anomalous pixel (in ``scores[gt]``
            order), or None to skip the PRO column.
    """
    num_total = scores.size
    # The one big allocation: a sorted copy in the input dtype (float32 for
    # typical maps, 4 bytes per pixel; no int64 index array, no float64 copy).
    sorted_scores = np.sort(scores)
    if num_total and np.isnan(sorted_scores[-1]):  # NaNs are sorted to the end
        raise ValueError("anomaly scores contain NaN")

    pos_scores = scores[gt]
    num_pos = int(pos_scores.size)
    num_neg = num_total - num_pos
    empty_int = np.zeros(0, dtype=np.int64)
    if num_pos == 0 or num_neg == 0:
        empty_pro = None if pos_region_ids is None else np.zeros(0)
        return PixelCurve(pos_scores[:0], empty_int, empty_int, empty_int, empty_pro, num_pos, num_neg)

    # Anomalous pixels by descending score; the order among ties is irrelevant
    # because only the last index of each run of equal scores is used.
    order = np.argsort(pos_scores)[::-1]
    pos_desc = pos_scores[order]
    group_last = np.append(np.flatnonzero(pos_desc[1:] != pos_desc[:-1]), num_pos - 1)
    thresholds = pos_desc[group_last]
    tp = (group_last + 1).astype(np.int64)
    tp_above = np.concatenate(([0], tp[:-1]))

    # Pixels of either class at or above / strictly above each threshold.
    # The queries are passed in ascending order, which searchsorted exploits.
    queries = thresholds[::-1]
    at_or_above = num_total - np.searchsorted(sorted_scores, queries, side="left")[::-1]
    above = num_total - np.searchsorted(sorted_scores, queries, side="right")[::-1]
    del sorted_scores
    fp = at_or_above.astype(np.int64) - tp
    fp_above = above.astype(np.int64) - tp_above

    pro = None
    if pos_region_ids is not None:
        # Each anomalous pixel adds 1 / (num_regions * area of its region) to
        # the PRO; accumulated in float64 over the (few) anomalous pixels only.
        _, region_index, region_area = np.unique(pos_region_ids, return_inverse=True, return_counts=True)
        weight_per_region = 1.0 / (region_area.size * region_area.astype(np.float64))
        cumulative = np.cumsum(weight_per_region[region_index.ravel()[order]])
        # Round-off must never push the overlap above 1.
        pro = np.minimum(cumulative[group_last], 1.0)

    return PixelCurve(thresholds, tp, fp, fp_above, pro, num_pos, num_neg)


def pixel_curve(scores: np.ndarray, gt: np.ndarray, region_ids: Optional[np.ndarray] = None) -> PixelCurve:
    """Build the shared :class:`PixelCurve` of a set of pixels.

    Args:
        scores: anomaly scores of any shape (typically ``(N, H, W)`` float32).
            NaN is rejected; infinities are fine.
        gt: ground truth of the same shape; non-zero pixels are anomalous.
            Masks must already be binarised.
        region_ids: optional region label of every pixel, same shape (e.g.
            from :func:`label_regions`); only read on anomalous pixels, where it
            must be positive.  Needed for :meth:`PixelCurve.aupro`.
    """
    scores = np.asarray(scores)
    gt = np.asarray(gt)
    if scores.shape != gt.shape:
        raise ValueError(f"scores and gt must have the same shape, got {scores.shape} and {gt.shape}")
    if scores.dtype.kind not in "fiu":
        scores = scores.astype(np.float32)
    gt_flat = gt.astype(bool, copy=False).reshape(-1)
    pos_region_ids = None
    if region_ids is not None:
        region_ids = np.asarray(region_ids)
        if region_ids.shape != gt.shape:
            raise ValueError(f"region_ids must have the shape of gt {gt.shape}, got {region_ids.shape}")
        pos_region_ids = region_ids.reshape(-1)[gt_flat]
        if pos_region_ids.size and pos_region_ids.min() <= 0:
            raise ValueError("region_ids must be positive on every anomalous pixel of gt")
    return _build_curve(scores.reshape(-1), gt_flat, pos_region_ids)


def _curve_metrics(curve: PixelCurve, pro_fpr_limit: float) -> dict[str, float]:
    """The four pixel metrics of a curve; AUPRO is nan if it has no PRO column."""
    return {
        "Pixel AUC": curve.roc_auc(),
        "Pixel AP": curve.average_precision(),
        "Pixel F1": curve.f1_max(),
        "Pixel AUPRO": _NAN if curve.pro is None else curve.aupro(pro_fpr_limit),
    }


def pixel_metrics(
    scores: np.ndarray,
    gt: np.ndarray,
    region_ids: Optional[np.ndarray] = None,
    pro_fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Pixel AUC, AP, F1-max and AUPRO from one shared sort.

    Arguments as in :func:`pixel_curve`.  ``"Pixel AUPRO"`` is nan when
    ``region_ids`` is None; every metric is nan when one class is absent.
    """
    return _curve_metrics(pixel_curve(scores, gt, region_ids), pro_fpr_limit)


def aupro(
    anomaly_maps: np.ndarray,
    masks: np.ndarray,
    region_ids: Optional[np.ndarray] = None,
    fpr_limit: float = 0.3,
) -> float:
    """Exact MVTec AUPRO: normalised area under PRO vs FPR up to ``fpr_limit``.

    Args:
        anomaly_maps: ``(N, H, W)`` or ``(H, W)`` scores.
        masks: ground-truth masks of the same shape.
        region_ids: region labels of the masks; computed with
            :func:`label_regions` (8-connectivity) when None.
        fpr_limit: upper integration limit on the false-positive rate.

    Returns:
        The AUPRO in ``[0, 1]``, or nan without normal or anomalous pixels.
    """
    if region_ids is None:
        region_ids = label_regions(masks)
    return pixel_curve(anomaly_maps, masks, region_ids).aupro(fpr_limit)


# --------------------------------------------------------------------------- #
# Image level and the public entry point
# --------------------------------------------------------------------------- #
def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image AUC, AP and F1-max with scikit-learn; nan when a class is absent."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and image scores must have the same length, got {labels.size} and {scores.size}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("image labels must be 0 (normal) or 1 (anomalous)")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():  # also covers an empty set
        return {"Image AUC": _NAN, "Image AP": _NAN, "Image F1": _NAN}
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {
        "Image AUC": float(roc_auc_score(labels, scores)),
        "Image AP": float(average_precision_score(labels, scores)),
        "Image F1": f1_max(precision, recall),
    }


def compute_metrics(
    anomaly_maps: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    image_scores: Optional[np.ndarray] = None,
    pro_fpr_limit: float = 0.3,
    compute_aupro: bool = True,
) -> dict[str, float]:
    """All image- and pixel-level metrics of one class.

    Args:
        anomaly_maps: ``(N, H, W)`` per-pixel anomaly scores (float32 keeps the
            memory use at about three times the maps' own size).
        labels: ``(N,)`` image labels, 0 normal / 1 anomalous.
        masks: ``(N, H, W)`` binary ground-truth masks (bool or 0/1).
        image_scores: ``(N,)`` image scores; the maximum of each map if None.
        pro_fpr_limit: FPR up to which the PRO curve is integrated.
        compute_aupro: if False, skip region labelling and report nan AUPRO.

    Returns:
        Dict with exactly the keys of :data:`METRIC_NAMES` (in that order) and
        python float values; a metric that is undefined for the data (a class
        missing among the labels or the pixels, e.g. every pixel metric of
        images labelled without masks) is nan.
    """
    anomaly_maps = np.asarray(anomaly_maps)
    masks = np.asarray(masks)
    labels = np.asarray(labels).reshape(-1)
    if anomaly_maps.ndim != 3:
        raise ValueError(f"anomaly_maps must be (N, H, W), got shape {anomaly_maps.shape}")
    if masks.shape != anomaly_maps.shape:
        raise ValueError(f"masks must have the shape of anomaly_maps {anomaly_maps.shape}, got {masks.shape}")
    if labels.size != anomaly_maps.shape[0]:
        raise ValueError(f"expected {anomaly_maps.shape[0]} image labels, got {labels.size}")
    if not 0.0 < pro_fpr_limit <= 1.0:
        raise ValueError(f"pro_fpr_limit must be in (0, 1], got {pro_fpr_limit}")

    if image_scores is None:
        image_scores = anomaly_maps.max(axis=(1, 2))
    results = image_metrics(labels, image_scores)

    results.update(_pixel_results(anomaly_maps, masks, compute_aupro, pro_fpr_limit))
    return {name: float(results[name]) for name in METRIC_NAMES}


def _pixel_results(anomaly_maps: np.ndarray, masks: np.ndarray, compute_aupro: bool,
                   pro_fpr_limit: float) -> dict[str, float]:
    """The pixel metrics of :func:`compute_metrics` (arguments checked there)."""
    gt = masks.astype(bool, copy=False).reshape(-1)  # no copy for bool masks
    if not gt.any():  # no anomalous pixel (e.g. image labels only): every pixel metric is nan, no sort needed
        if np.isnan(anomaly_maps).any():
            raise ValueError("anomaly scores contain NaN")
        return dict.fromkeys((m for m in METRIC_NAMES if m.startswith("Pixel")), _NAN)
    pos_region_ids = None
    if compute_aupro:
        # Keep only the anomalous pixels' ids so the full int32 label image is
        # released before the sort allocates its copy of the scores.
        pos_region_ids = label_regions(masks).reshape(-1)[gt]
    scores = anomaly_maps.reshape(-1)
    if scores.dtype.kind not in "fiu":
        scores = scores.astype(np.float32)
    return _curve_metrics(_build_curve(scores, gt, pos_region_ids), pro_fpr_limit)
