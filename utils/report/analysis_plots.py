"""After-training analysis figures: metrics against the number of shots, and per-class failures.

Both read the ``<run>_epoch<E>_metrics.csv`` files the training scripts write
(``Class Name`` rows and a ``Mean`` row; ``<metric> std`` columns when
``--ref_groups`` > 1) and draw with the Agg backend (files only, no windows).
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.atomic import save_csv  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.formats.run_outputs import (class_rows, mean_row, metrics_csv_epochs, read_metrics_csv,  # noqa: E402
                                       RunOutputs, shot_runs)
from utils.metrics import METRIC_NAMES  # noqa: E402
from utils.report.plots import _save  # noqa: E402


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_metrics(metrics: Sequence[str], flag: str = "--metrics") -> List[str]:
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise UserError(f"{flag}: unknown metric(s) {', '.join(map(repr, unknown))}; choose from "
                        f"{', '.join(map(repr, METRIC_NAMES))}")
    return list(metrics)


# --------------------------------------------------------------------------- metrics against shots

def shot_sensitivity_table(checkpoint_dir: str, settings: Optional[Sequence[str]], shots: Optional[Sequence[int]],
                           metrics: Sequence[str], epoch: Optional[int] = None) -> pd.DataFrame:
    """Mean-row values (and std when present) per setting, shots and metric, from the latest (or given) epoch.

    A missing shot folder or CSV is a warning naming it; nothing left is a UserError.
    """
    metrics = check_metrics(metrics)
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"--checkpoint_dir {checkpoint_dir}: folder not found")
    found = shot_runs(checkpoint_dir)
    if not settings:
        settings = list(found)
        if not settings:
            raise UserError(f"--checkpoint_dir {checkpoint_dir}: no <setting>_<k>shot folders; "
                            "run main_extended_multi_shot.py first or point to its --checkpoint_path")
    rows = [row for setting in settings for k in (shots or found.get(setting, []))
            for row in _shot_rows(checkpoint_dir, setting, k, metrics, epoch)]
    frame = pd.DataFrame(rows, columns=["setting", "shots", "metric", "value", "std", "epoch", "csv"])
    if frame.empty or not np.isfinite(frame["value"]).any():
        raise UserError(f"--checkpoint_dir {checkpoint_dir}: nothing to plot for --setting "
                        f"{' '.join(settings)}; check the setting names, --shots and --epoch")
    return frame.sort_values(["setting", "metric", "shots"], kind="stable").reset_index(drop=True)


def _shot_rows(checkpoint_dir: str, setting: str, k: int, metrics: Sequence[str], epoch: Optional[int]) -> List[dict]:
    """The plotted rows of one ``<setting>_<k>shot`` run; a warning naming what is missing, and none, otherwise."""
    outputs = RunOutputs(os.path.join(checkpoint_dir, f"{setting}_{k}shot"), f"{setting}_{k}shot")
    if not os.path.isdir(outputs.folder):
        warn(f"{outputs.folder} not found: {setting} at {k} shots is left out")
        return []
    csvs = dict(metrics_csv_epochs(outputs.folder, outputs.name))
    if not csvs:
        warn(f"no {outputs.name}_epoch<E>_metrics.csv in {outputs.folder}: {setting} at {k} shots is left out")
        return []
    chosen = max(csvs) if epoch is None else epoch
    if chosen not in csvs:
        warn(f"{outputs.metrics_csv(chosen)} not found (epochs there: {', '.join(map(str, sorted(csvs)))}): "
             f"{setting} at {k} shots is left out")
        return []
    table = read_metrics_csv(csvs[chosen], "--checkpoint_dir")
    try:
        mean = mean_row(table)
    except ValueError:
        warn(f"{csvs[chosen]} has no Mean row: left out")
        return []
    rows = []
    for metric in metrics:
        if metric not in table.columns:
            warn(f"{csvs[chosen]} has no '{metric}' column: left out")
            continue
        std_col = f"{metric} std"
        rows.append({"setting": setting, "shots": int(k), "metric": metric, "value": float(mean[metric]),
                     "std": float(mean[std_col]) if std_col in table.columns else np.nan,
                     "epoch": chosen, "csv": csvs[chosen]})
    return rows


def fitted_limits(low: float, high: float, ceiling: Optional[float] = 1.0, margin: float = 0.08) -> Tuple[float, float]:
    """Axis limits around [low, high] with a margin; never above ``ceiling`` + margin, never below 0."""
    span = max(high - low, 0.02)
    lo, hi = low - margin * span - 0.005, high + margin * span + 0.005
    if ceiling is not None:
        hi = min(hi, ceiling + margin * span + 0.005)
    return max(lo, 0.0), hi


def plot_shot_sensitivity(frame: pd.DataFrame, out: str, title: Optional[str] = None) -> str:
    """One line per setting and metric, error bars from the std column; writes ``out`` and ``<out>.csv``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(frame["setting"]))}
    styles = {m: ("-", "--", ":", "-.")[i % 4] for i, m in enumerate(dict.fromkeys(frame["metric"]))}
    markers = {m: "osD^v"[i % 5] for i, m in enumerate(styles)}
    for (setting, metric), part in frame.groupby(["setting", "metric"], sort=False):
        part = part[np.isfinite(part["value"])]
        std = part["std"].to_numpy(dtype=float)
        ax.errorbar(part["shots"], part["value"], yerr=np.where(np.isfinite(std), std, 0) if np.isfinite(std).any()
                    else None, color=colors[setting], linestyle=styles[metric], marker=markers[metric], capsize=3,
                    label=f"{setting}: {metric}")
    std = frame["std"].fillna(0).to_numpy(dtype=float)
    values = frame["value"].to_numpy(dtype=float)
    ok = np.isfinite(values)
    ax.set_ylim(*fitted_limits(float(np.min(values[ok] - std[ok])), float(np.max(values[ok] + std[ok]))))
    shots = sorted(frame["shots"].unique())
    ax.set_xticks(shots)
    ax.set_xlabel("reference shots per class (k)")
    ax.set_ylabel("mean over unseen classes")
    epochs = sorted(frame["epoch"].unique())
    ax.set_title(title or f"metrics against shots (epoch {', '.join(map(str, epochs))})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, out)
    table_path = os.path.splitext(out)[0] + ".csv"
    save_csv(table_path, frame)
    return table_path


# --------------------------------------------------------------------------- per-class failures

def _class_rows(table: pd.DataFrame, metric: str, flag: str) -> Tuple[pd.DataFrame, float]:
    if metric not in table.columns:
        raise UserError(f"{flag}: no '{metric}' column (columns: {', '.join(table.columns[1:])}); choose --metric")
    classes = class_rows(table)[["Class Name", metric]].copy()
    classes[metric] = pd.to_numeric(classes[metric], errors="coerce")
    try:
        mean = float(mean_row(table)[metric])
    except ValueError:  # no Mean row: the mean of the classes
        mean = float(np.nanmean(classes[metric]))
    return classes, mean


def plot_classwise(table: pd.DataFrame, metric: str, out: str, top_k: int = 3, title: Optional[str] = None,
                   compare: Optional[pd.DataFrame] = None, labels: Sequence[str] = ("run 1", "run 2")) -> pd.DataFrame:
    """Horizontal bars per class, best at the top; the ``top_k`` worst in red, the Mean as a dashed line.

    With ``compare``, the two runs side by side and a second panel with the
    per-class difference (``compare`` - ``table``).  Returns the plotted numbers.
    """
    classes, mean = _class_rows(table, metric, "--csv")
    classes = classes[np.isfinite(classes[metric])]
    if classes.empty:
        raise UserError(f"--csv: no class has a finite '{metric}'; nothing to plot")
    classes = classes.sort_values(metric, ascending=False, kind="stable").reset_index(drop=True)
    worst = set(classes["Class Name"].iloc[len(classes) - min(top_k, len(classes)):]) if top_k > 0 else set()
    names = classes["Class Name"].tolist()
    y = np.arange(len(names))[::-1]  # best at the top
    height = max(2.8, 0.38 * len(names) + 1.4)
    if compare is None:
        fig, ax = plt.subplots(figsize=(7.0, height))
        low, high = _single_bars(ax, classes[metric].to_numpy(dtype=float), y, mean, names, worst)
        result = classes.assign(worst=[n in worst for n in names])
    else:
        fig, (ax, diff_ax) = plt.subplots(1, 2, figsize=(11.0, height), sharey=True,
                                          gridspec_kw={"width_ratios": [2.2, 1]})
        second, other_mean = _compared_values(compare, metric, names)
        low, high = _compared_bars(ax, diff_ax, classes[metric].to_numpy(dtype=float), second, y, (mean, other_mean),
                                   labels, metric)
        result = classes.assign(**{f"{metric} ({labels[1]})": second,
                                   "difference": second - classes[metric].to_numpy(dtype=float),
                                   "worst": [n in worst for n in names]})
    _finish_classwise(fig, ax, (low, high), y, names, worst, metric, compare is not None,
                      title or f"{metric} per class (worst {min(top_k, len(names))} in red)")
    _save(fig, out)
    return result


def _single_bars(ax, values: np.ndarray, y: np.ndarray, mean: float, names: Sequence[str], worst: set):
    bars = ax.barh(y, values, color=["tab:red" if n in worst else "tab:blue" for n in names])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"Mean {mean:.3f}")
    return min(values.min(), mean), max(values.max(), mean)


def _compared_values(compare: pd.DataFrame, metric: str, names: Sequence[str]) -> Tuple[np.ndarray, float]:
    """The second run's value per class of the first (nan where it has none) and its mean."""
    other, other_mean = _class_rows(compare, metric, "--compare")
    other = other.set_index("Class Name")[metric]
    missing = [n for n in names if n not in other.index]
    if missing:
        warn(f"--compare: no row for {', '.join(missing)}; drawn for the first run only")
    return np.array([other.get(n, np.nan) for n in names], dtype=float), other_mean


def _compared_bars(ax, diff_ax, values: np.ndarray, second: np.ndarray, y: np.ndarray, means: Tuple[float, float],
                   labels: Sequence[str], metric: str):
    h = 0.4
    first_bars = ax.barh(y + h / 2, values, height=h, color="tab:blue", label=labels[0])
    second_bars = ax.barh(y - h / 2, np.nan_to_num(second, nan=0.0), height=h, color="tab:orange", label=labels[1])
    ax.bar_label(first_bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=7)
    ax.bar_label(second_bars, labels=["" if not np.isfinite(v) else f"{v:.3f}" for v in second], padding=2,
                 fontsize=7)
    for mean, label, color in zip(means, labels, ("tab:blue", "tab:orange")):
        ax.axvline(mean, color=color, linestyle="--", linewidth=1, label=f"{label} Mean {mean:.3f}")
    finite = second[np.isfinite(second)]
    low = min(values.min(), *means, *(finite.tolist() or [values.min()]))
    high = max(values.max(), *means, *(finite.tolist() or [values.max()]))
    delta = second - values
    diff_bars = diff_ax.barh(y, np.nan_to_num(delta, nan=0.0),
                             color=["tab:green" if d >= 0 else "tab:red" for d in np.nan_to_num(delta)])
    diff_ax.bar_label(diff_bars, labels=["n/a" if not np.isfinite(d) else f"{d:+.3f}" for d in delta],
                      padding=2, fontsize=7)
    diff_ax.axvline(0, color="black", linewidth=0.8)
    reach = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 0.01
    diff_ax.set_xlim(-1.8 * reach - 1e-3, 1.8 * reach + 1e-3)  # room for the "+0.000" labels
    diff_ax.set_xlabel(f"{metric}: {labels[1]} - {labels[0]}")
    diff_ax.grid(axis="x", alpha=0.3)
    return low, high


def _finish_classwise(fig, ax, span: Tuple[float, float], y: np.ndarray, names: Sequence[str], worst: set,
                      metric: str, compared: bool, title: str) -> None:
    left, right = fitted_limits(*span, ceiling=None, margin=0.15)
    ax.set_xlim(left, right + 0.12 * (right - left))  # room for the value labels
    ax.set_yticks(y, names)
    for tick, name in zip(ax.get_yticklabels(), names):
        if name in worst:
            tick.set_color("tab:red")
    ax.set_xlabel(metric)
    ax.grid(axis="x", alpha=0.3)
    if not compared:
        ax.legend(fontsize=8, loc="lower right")
    else:
        # below the x label at any figure height: 0.5 inch under the axes, not a fraction of them
        below = ax.transAxes + ScaledTranslation(0, -0.5, fig.dpi_scale_trans)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=2)
    ax.set_title(title)
