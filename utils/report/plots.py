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
