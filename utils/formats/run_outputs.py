"""The result files of a run: every file name, the metrics tables and their ``Mean`` row.

One :class:`RunOutputs` per evaluated configuration (one number of reference
shots) names every file of ``<checkpoint_path>/<run>/``; callers ask it
(``outputs.metrics_csv(epoch)``) instead of spelling a name.  A metrics table
has one row per unseen class in the columns :data:`CSV_COLUMNS` (plus
``<metric> std`` columns for reference groups) and a last row named
:data:`MEAN`; :func:`mean_row` reads it.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from utils.atomic import save_csv, save_json
from utils.errors import UserError
from utils.metrics import METRIC_NAMES

CLASS_COLUMN = "Class Name"
CSV_COLUMNS = (CLASS_COLUMN,) + METRIC_NAMES
MAP_COLUMN = "Map"                            # the maps and baseline tables: which map a row is about
IMAGE_COLUMNS = (CLASS_COLUMN, "Image", "Label")  # the per-image scores tables, then one column per map
MEAN = "Mean"
SHOT_FOLDER = re.compile(r"^(?P<setting>.+)_(?P<k>\d+)shot$")


@dataclass(frozen=True)
class RunOutputs:
    """The files of one evaluated configuration: ``<folder>/<name>...``."""
    folder: str
    name: str

    def path(self, suffix: str) -> str:
        return os.path.join(self.folder, f"{self.name}{suffix}")

    def metrics_csv(self, epoch: int) -> str:
        return self.path(f"_epoch{epoch}_metrics.csv")

    def metrics_json(self, epoch: int) -> str:
        return self.path(f"_epoch{epoch}_metrics.json")

    def pixel_auroc_png(self, epoch: int) -> str:
        return self.path(f"_epoch{epoch}_pixel_auroc.png")

    def maps_csv(self, epoch: int) -> str:
        """The metrics of each single map (a row per class and map, Mean rows per map)."""
        return self.path(f"_epoch{epoch}_maps.csv")

    def scores_csv(self, epoch: int) -> str:
        """One row per test image: its class, path, label and the image score of each map computed."""
        return self.path(f"_epoch{epoch}_scores.csv")

    def baseline_csv(self, epoch: int) -> str:
        """The kNN baseline's table beside the evaluation of ``epoch`` (a ``Map`` column, as the maps CSV)."""
        return self.path(f"_epoch{epoch}_baseline.csv")

    def baseline_scores_csv(self, epoch: int) -> str:
        """The kNN baseline's image scores beside the evaluation of ``epoch``, as :meth:`scores_csv`."""
        return self.path(f"_epoch{epoch}_baseline_scores.csv")

    def knn_only_csv(self) -> str:
        """``--baseline knn``: the baseline evaluated alone."""
        return self.path("_baseline.csv")

    def knn_only_scores_csv(self) -> str:
        return self.path("_baseline_scores.csv")

    def knn_only_json(self) -> str:
        return self.path("_baseline.json")

    def latest_checkpoint(self) -> str:
        return self.path("_latest.pth")

    def best_checkpoint(self) -> str:
        return self.path("_best.pth")

    def run_record(self) -> str:
        return self.path("_run.json")

    def history_csv(self) -> str:
        return self.path("_history.csv")

    def history_png(self) -> str:
        return self.path("_history.png")

    def heatmap(self, class_name: str, role: str, image_path: str) -> str:
        """``heatmaps/<class>_<role>_<type folder>_<image stem>.png``."""
        kind, stem = image_label(image_path)
        return os.path.join(self.folder, "heatmaps", f"{class_name}_{role}_{kind}_{stem}.png")


def image_label(image_path: str) -> Tuple[str, str]:
    """(type folder, file stem) of a test image, e.g. ("crack", "000")."""
    return os.path.basename(os.path.dirname(image_path)), os.path.splitext(os.path.basename(image_path))[0]


def metrics_csv_epochs(folder: str, run: str) -> List[Tuple[int, str]]:
    """(epoch, path) of every ``<run>_epoch<E>_metrics.csv`` in ``folder``, sorted by epoch NUMBER."""
    pattern = re.compile(rf"^{re.escape(run)}_epoch(\d+)_metrics\.csv$")
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in (os.listdir(folder) if os.path.isdir(folder) else []) if (m := pattern.match(name))]
    return sorted(found)


def shot_runs(checkpoint_dir: str) -> Dict[str, List[int]]:
    """{setting: [k, ...]} of the ``<setting>_<k>shot`` folders of a multi-shot run."""
    runs: Dict[str, List[int]] = {}
    for name in sorted(os.listdir(checkpoint_dir)):
        match = SHOT_FOLDER.match(name)
        if match and os.path.isdir(os.path.join(checkpoint_dir, name)):
            runs.setdefault(match["setting"], []).append(int(match["k"]))
    return {s: sorted(ks) for s, ks in runs.items()}


# --------------------------------------------------------------------------- tables

def group_std(groups: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Sample standard deviation of each metric over reference groups (empty for fewer than two)."""
    if len(groups) < 2:
        return {}
    values = np.array([[g[m] for m in METRIC_NAMES] for g in groups], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every group stays nan
        return dict(zip(METRIC_NAMES, np.nanstd(values, axis=0, ddof=1).tolist()))


def results_table(metrics: Dict[str, Dict[str, float]],
                  groups: Optional[Dict[str, Sequence[Dict[str, float]]]] = None) -> pd.DataFrame:
    """One row per class and a Mean row; ``<metric> std`` columns when several reference groups were evaluated.

    ``metrics``: per class, the mean over its groups; ``groups``: per class, one metrics dict per
    reference group.  The Mean row's std is the std over the groups of the class-averaged metric.
    """
    groups = groups or {name: [] for name in metrics}
    stds = {name: group_std(groups[name]) for name in metrics}
    with_std = any(stds.values())
    rows = [{CLASS_COLUMN: name, **values, **{f"{m} std": v for m, v in stds[name].items()}}
            for name, values in metrics.items()]
    columns = list(CSV_COLUMNS) + ([f"{m} std" for m in METRIC_NAMES] if with_std else [])
    frame = pd.DataFrame(rows, columns=columns)
    mean = frame[list(METRIC_NAMES)].mean(axis=0, skipna=True).to_dict()
    if with_std:
        num_groups = min(len(g) for g in groups.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            group_means = [{m: float(np.nanmean([groups[name][g][m] for name in metrics])) for m in METRIC_NAMES}
                           for g in range(num_groups)]
        mean.update({f"{m} std": v for m, v in group_std(group_means).items()})
    return pd.concat([frame, pd.DataFrame([{CLASS_COLUMN: MEAN, **mean}])], ignore_index=True)


def mean_row(table: pd.DataFrame) -> pd.Series:
    """The ``Mean`` row of a metrics table."""
    rows = table[table[CLASS_COLUMN].astype(str) == MEAN]
    if rows.empty:
        raise ValueError("the metrics table has no Mean row")
    return rows.iloc[-1]


def class_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The per-class rows of a metrics table (without the Mean row)."""
    return table[table[CLASS_COLUMN].astype(str) != MEAN]


def write_table(csv_path: str, json_path: Optional[str], table: pd.DataFrame, **header) -> None:
    """The table as CSV (5 decimals) and, with ``json_path``, as JSON: ``header`` plus ``classes``
    {class: {column: value}} (the Mean row included)."""
    save_csv(csv_path, table)
    if json_path is not None:
        columns = [c for c in table.columns if c != CLASS_COLUMN]
        save_json(json_path, dict(header, classes={r[CLASS_COLUMN]: {m: r[m] for m in columns}
                                                   for _, r in table.iterrows()}))


def read_metrics_csv(path: str, flag: str = "--csv") -> pd.DataFrame:
    """A metrics CSV with its Mean row; UserError naming the file when it is not one."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found; give a <run>_epoch<E>_metrics.csv written by main.py")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path}: cannot read it as CSV ({type(err).__name__})") from None
    if CLASS_COLUMN not in table.columns:
        raise UserError(f"{flag} {path}: no '{CLASS_COLUMN}' column; give a metrics CSV written by main.py")
    table[CLASS_COLUMN] = table[CLASS_COLUMN].astype(str)
    return table
