"""Training curves: ``<run>_history.csv`` and ``<run>_history.png``, rewritten after every epoch.

One row per epoch: stage, the mean of each loss, learning rate, training
seconds, skipped (non-finite) optimizer steps, and the ``Mean`` row of the
evaluation after that epoch (empty where none ran).  ``--tensorboard DIR``
writes the same scalars with ``torch.utils.tensorboard`` as well.

On ``--resume`` the rows of the epochs up to the checkpoint are kept and later
ones (trained after the checkpoint by the interrupted run) are dropped, so no
epoch appears twice.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.atomic import atomic_path, check_writable  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.formats.run_outputs import RunOutputs, mean_row  # noqa: E402
from utils.metrics import METRIC_NAMES  # noqa: E402

LOSSES = ("vq", "occ", "flow")
LOSS_COLUMNS = tuple(f"{name}_loss" for name in LOSSES)
COLUMNS = ("epoch", "stage") + LOSS_COLUMNS + ("lr", "seconds", "skipped_steps", "eval_seconds") + METRIC_NAMES


def check_tensorboard(log_dir: Optional[str]) -> None:
    """Fail early with one line when ``--tensorboard`` is asked for and the package is missing."""
    if not log_dir:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError(f"--tensorboard {log_dir}: the tensorboard package is not installed; "
                        "pip install tensorboard, or drop --tensorboard") from None
    check_writable(log_dir, "--tensorboard")


class TrainingHistory:
    """The per-epoch record of one run (one number of reference shots)."""

    def __init__(self, out: RunOutputs, tensorboard_dir: Optional[str] = None, resume_epoch: int = 0):
        self.out = out
        self.csv_path, self.png_path = out.history_csv(), out.history_png()
        self.rows: Dict[int, dict] = {}
        if resume_epoch:
            self._restore(resume_epoch)
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events an interrupted run wrote after its checkpoint
            self.writer = SummaryWriter(os.path.join(tensorboard_dir, out.name),
                                        purge_step=resume_epoch + 1 if resume_epoch else None)

    def _restore(self, epoch: int) -> None:
        if os.path.isfile(self.csv_path):
            try:
                frame = pd.read_csv(self.csv_path)
            except (OSError, ValueError, pd.errors.ParserError):
                frame = pd.DataFrame(columns=list(COLUMNS))
            for row in frame.to_dict("records"):
                if "epoch" in row and 0 < int(row["epoch"]) <= epoch:
                    self.rows[int(row["epoch"])] = {c: row.get(c, math.nan) for c in COLUMNS}
        for done, row in self.rows.items():  # an evaluation written just before the kill
            metrics_csv = self.out.metrics_csv(done)
            if all(pd.isna(row[m]) for m in METRIC_NAMES) and os.path.isfile(metrics_csv):
                mean = mean_row(pd.read_csv(metrics_csv))
                row.update({m: float(mean[m]) for m in METRIC_NAMES})

    def add_epoch(self, epoch: int, stage: int, losses: Dict[str, float], lr: float, seconds: float,
                  skipped_steps: int) -> None:
        row = {c: math.nan for c in COLUMNS}
        row.update(epoch=epoch, stage=stage, lr=lr, seconds=seconds, skipped_steps=skipped_steps,
                   **{f"{name}_loss": losses.get(name, math.nan) for name in LOSSES})
        self.rows[epoch] = row
        if self.writer is not None:
            for name in LOSSES:
                self.writer.add_scalar(f"loss/{name}", losses.get(name, math.nan), epoch)
            for key in ("lr", "seconds", "skipped_steps"):
                self.writer.add_scalar(f"train/{key}", row[key], epoch)
            self.writer.flush()
        self.write()

    def add_evaluation(self, epoch: int, table: pd.DataFrame, seconds: float) -> None:
        """Record the ``Mean`` row of the evaluation after ``epoch`` (a results table)."""
        mean = mean_row(table)
        row = self.rows.setdefault(epoch, dict({c: math.nan for c in COLUMNS}, epoch=epoch))
        row.update({m: float(mean[m]) for m in METRIC_NAMES}, eval_seconds=seconds)
        if self.writer is not None:
            for m in METRIC_NAMES:
                self.writer.add_scalar(f"eval/{m}", float(mean[m]), epoch)
            self.writer.flush()
        self.write()

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([self.rows[e] for e in sorted(self.rows)], columns=list(COLUMNS))
        for column in ("epoch", "stage", "skipped_steps"):
            frame[column] = frame[column].astype("Int64")
        return frame

    def write(self) -> None:
        frame = self.frame()
        with atomic_path(self.csv_path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        plot_history(frame, self.png_path, title=f"{self.out.name}: training history")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def spans_decades(values: np.ndarray) -> bool:
    """True when the finite values are all positive and their max/min ratio is at least 10."""
    finite = values[np.isfinite(values)]
    return finite.size > 1 and finite.min() > 0 and finite.max() / finite.min() >= 10


def plot_history(frame: pd.DataFrame, path: str, title: str = "training history") -> None:
    """Each loss against the epoch (log scale where it spans decades) and the evaluated Mean AUROCs."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    epochs = frame["epoch"].to_numpy(dtype=float)
    stages = frame["stage"].to_numpy(dtype=float, na_value=np.nan)
    stage2 = epochs[stages == 2]
    boundary = stage2.min() - 0.5 if 0 < len(stage2) and np.any(stages == 1) else None
    panels: List = list(axes.flat)
    for ax, column, name in zip(panels, LOSS_COLUMNS, LOSSES):
        values = frame[column].to_numpy(dtype=float)
        ax.plot(epochs, values, marker="o", markersize=3, color="tab:blue")
        log = spans_decades(values)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{name} loss" + (" (log scale)" if log else ""))
    ax = panels[3]
    evaluated = frame.dropna(subset=["Image AUC", "Pixel AUC"], how="all")
    for metric, label, color in (("Image AUC", "image AUROC", "tab:red"), ("Pixel AUC", "pixel AUROC", "tab:green")):
        ax.plot(evaluated["epoch"].to_numpy(dtype=float), evaluated[metric].to_numpy(dtype=float),
                marker="o", markersize=4, label=f"Mean {label}", color=color)
    ax.set_title("evaluation (Mean over the unseen classes)")
    if len(evaluated):
        lowest = float(np.nanmin(evaluated[["Image AUC", "Pixel AUC"]].to_numpy(dtype=float)))
        ax.set_ylim(max(0.0, min(lowest - 0.02, 0.9)), 1.005)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    for ax in panels:
        if boundary is not None:  # mark the start of stage 2
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle(title + (" (dashed line: stage 2 starts)" if boundary is not None else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
