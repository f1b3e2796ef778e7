"""The files of ``predict.py``: every name in the output folder and the ``scores.csv`` format.

``<out>/`` holds

* ``scores.csv``: one row per image in the order the images were found, columns
  :data:`SCORE_COLUMNS`: the image path as given, its image score, the predicted label
  (:data:`ANOMALOUS`, :data:`NORMAL`, or :data:`FAILED` for an image that could not be
  read, with the reason in ``error``) and the threshold it was judged against;
* ``heatmaps/<name>.png``: per image, the input and its anomaly-map overlay;
* ``maps/<name>.npy`` (``--save_maps``): per image the (S, S) anomaly map, float16;
* ``predict_run.json``: the run record (utils.report.run_record);
* ``.scratch-*``: the per-level model outputs during a run, deleted at its end.

``<name>`` is the image's path relative to the ``--images`` folder it was found in (a file given
by itself: its file name), without the extension; two images that would share a name keep their
extension in it (``a.png`` -> ``a_png``), and a name found under two folders a number (``a_2``).
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import pandas as pd

from utils.atomic import atomic_path
from utils.errors import UserError

SCORE_COLUMNS = ("image", "score", "label", "threshold", "error")
ANOMALOUS, NORMAL, FAILED = "anomalous", "normal", "failed"


@dataclass(frozen=True)
class PredictionOutputs:
    """The files of one prediction run in ``folder``."""
    folder: str

    def scores_csv(self) -> str:
        return os.path.join(self.folder, "scores.csv")

    def run_record(self) -> str:
        return os.path.join(self.folder, "predict_run.json")

    def heatmap(self, name: str) -> str:
        return os.path.join(self.folder, "heatmaps", f"{name}.png")

    def raw_map(self, name: str) -> str:
        return os.path.join(self.folder, "maps", f"{name}.npy")

    @contextlib.contextmanager
    def scratch(self) -> Iterator[str]:
        """A hidden temporary folder inside the output folder (large: the per-level outputs of every
        image), deleted when the block ends, however it ends."""
        os.makedirs(self.folder, exist_ok=True)
        path = tempfile.mkdtemp(prefix=".scratch-", dir=self.folder)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def output_names(found: Sequence[Tuple[str, str]]) -> List[str]:
    """The ``<name>`` of each (image path, the folder it was found in, or "" for a file given by itself)."""
    def stem(path: str, root: str, keep_extension: bool) -> str:
        relative = os.path.relpath(path, root) if root else os.path.basename(path)
        base, extension = os.path.splitext(relative)
        return f"{base}_{extension[1:]}" if keep_extension and extension else base

    plain = [stem(path, root, False) for path, root in found]
    shared = {name for name, count in Counter(plain).items() if count > 1}
    names = [stem(path, root, True) if name in shared else name for (path, root), name in zip(found, plain)]
    seen: Counter = Counter()
    for i, name in enumerate(names):  # the same name under two --images folders: _2, _3, ...
        seen[name] += 1
        if seen[name] > 1:
            names[i] = f"{name}_{seen[name]}"
    return names


def judge(score: float, threshold: float) -> str:
    """:data:`ANOMALOUS` when the score is above the threshold, else :data:`NORMAL`."""
    return ANOMALOUS if score > threshold else NORMAL


class ScoresWriter:
    """Writes ``scores.csv`` row by row to a temporary file that replaces the final name only when
    every row is written (:meth:`open`), so an interrupted run leaves the previous file intact."""

    def __init__(self, handle):
        self._writer = csv.writer(handle)
        self._writer.writerow(SCORE_COLUMNS)
        self.counts = Counter()

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str) -> Iterator["ScoresWriter"]:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            yield cls(handle)

    def scored(self, image: str, score: float, threshold: float) -> str:
        label = judge(score, threshold)
        self._writer.writerow([image, f"{score:.9g}", label, f"{threshold:.9g}", ""])
        self.counts[label] += 1
        return label

    def failed(self, image: str, threshold: float, error: str) -> None:
        self._writer.writerow([image, "", FAILED, f"{threshold:.9g}", error])
        self.counts[FAILED] += 1


def read_scores(path: str, flag: str = "--scores") -> pd.DataFrame:
    """A ``scores.csv`` as a table (``score`` NaN on failed rows); UserError naming the file when it is not one."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found; give the scores.csv written by predict.py")
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values={"score": [""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path}: cannot read it as CSV ({type(err).__name__})") from None
    if tuple(table.columns) != SCORE_COLUMNS:
        raise UserError(f"{flag} {path}: columns {list(table.columns)}, expected {list(SCORE_COLUMNS)}")
    table["score"] = table["score"].astype(float)
    return table
