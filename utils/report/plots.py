"""Figures a person can read without the code: per-class metric bars and heat-map panels."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.atomic import atomic_path  # noqa: E402


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_class_metric(table: pd.DataFrame, metric: str, path: str, title: Optional[str] = None,
                      highlight_worst: int = 0) -> None:
    """Bar chart of one metric per class (the "Mean" row drawn as a dashed line).

    The ``highlight_worst`` lowest classes are drawn in red.
    """
    classes = table[table["Class Name"] != "Mean"]
    values = classes[metric].to_numpy(dtype=float)
    names = classes["Class Name"].astype(str).tolist()
    colors = np.array(["tab:blue"] * len(values), dtype=object)
    if highlight_worst:
        finite = np.where(np.isfinite(values), values, np.inf)
        colors[np.argsort(finite, kind="stable")[:highlight_worst]] = "tab:red"
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 1.5), 4.0))
    ax.bar(range(len(values)), values, color=list(colors))
    ax.set_xticks(range(len(values)), names, rotation=45, ha="right")
    mean = np.nanmean(values) if np.isfinite(values).any() else np.nan
    if np.isfinite(mean):
        ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.legend(loc="lower right")
    lower = np.nanmin(values) if np.isfinite(values).any() else 0.0
    ax.set_ylim(max(0.0, min(0.5, lower - 0.05)), 1.0)
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def save_heatmap(out_path: str, image: np.ndarray, mask: np.ndarray, map: np.ndarray, label: int,
                 title: str = "", value_range: Optional[Sequence[float]] = None, pixel_labels: bool = True,
                 **_) -> None:
    """Three panels: the image, the image with the ground-truth contour, the anomaly-map overlay.
    ``pixel_labels`` False: the class has image labels only, so nothing is outlined."""
    vmin, vmax = value_range if value_range is not None else (float(map.min()), float(map.max()))
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    if pixel_labels and mask.any():
        axes[1].contour(mask.astype(float), levels=[0.5], colors="red", linewidths=1.2)
    kind = "ground truth" if pixel_labels else "image label only"
    axes[1].set_title(kind + (" (anomalous)" if label and not pixel_labels else "" if label else " (normal)"))
    axes[2].imshow(image)
    overlay = axes[2].imshow(map, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    axes[2].set_title(f"anomaly map (max {float(map.max()):.3f})")
    fig.colorbar(overlay, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    _save(fig, out_path)



class PredictionHeatmaps:
    """The heat-maps of ``predict.py``, two panels in the style of :func:`save_heatmap`: the input, and the
    anomaly-map overlay on the colour scale ``value_range`` shared by every image of a run, the image
    ``threshold`` marked on the colour bar.  One figure is built and redrawn for every image: a new figure
    and colour bar per image and zlib's default PNG compression took two thirds of the drawing time
    (compression level 1 here: files about 20 % larger)."""

    def __init__(self, value_range: Sequence[float], threshold: Optional[float] = None, size: int = 224):
        vmin, vmax = value_range
        self.figure, axes = plt.subplots(1, 2, figsize=(7.4, 3.8))
        self.figure.subplots_adjust(left=0.02, right=0.9, bottom=0.03, top=0.84, wspace=0.08)
        blank = np.zeros((size, size, 3))
        self._layers = [axes[0].imshow(blank), axes[1].imshow(blank),
                        axes[1].imshow(blank[..., 0], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)]
        axes[0].set_title("image")
        self._map_title = axes[1].set_title("anomaly map")
        bar = self.figure.colorbar(self._layers[2], ax=axes[1], fraction=0.046, pad=0.04)
        if threshold is not None and vmin <= threshold <= vmax:
            bar.ax.axhline(threshold, color="black", linewidth=2)
        for ax in axes:
            ax.axis("off")
        self._title = self.figure.suptitle("")

    def save(self, out_path: str, image: np.ndarray, map: np.ndarray, title: str) -> None:
        """Draw ``image`` (S, S, 3) in [0, 1] and its (S, S) ``map`` under ``title`` into the PNG ``out_path``."""
        for layer, data in zip(self._layers, (image, image, map)):
            layer.set_data(data)
        self._map_title.set_text(f"anomaly map (max {float(map.max()):.3f})")
        self._title.set_text(title)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with atomic_path(out_path) as tmp:
            self.figure.savefig(tmp, format="png", dpi=120, pil_kwargs={"compress_level": 1})

    def close(self) -> None:
        plt.close(self.figure)


def save_prediction_heatmap(out_path: str, image: np.ndarray, map: np.ndarray, title: str,
                            value_range: Sequence[float], threshold: Optional[float] = None) -> None:
    """One heat-map of :class:`PredictionHeatmaps` (for many images, keep one and call its ``save``)."""
    canvas = PredictionHeatmaps(value_range, threshold, size=map.shape[0])
    try:
        canvas.save(out_path, image, map, title)
    finally:
        canvas.close()
