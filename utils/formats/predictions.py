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
from typing import Iterator, List, Optional, Sequence, Tuple

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


class OutputNames:
    """Unique ``<name>`` s: a name already taken gets the first free suffix ``_2``, ``_3``, ... (checked
    against every name taken so far, suffixed ones included)."""

    def __init__(self):
        self.taken = set()

    def claim(self, name: str) -> str:
        unique, number = name, 1
        while unique in self.taken:
            number += 1
            unique = f"{name}_{number}"
        self.taken.add(unique)
        return unique


def _stem(path: str, root: str, keep_extension: bool) -> str:
    relative = os.path.relpath(path, root) if root else os.path.basename(path)
    base, extension = os.path.splitext(relative)
    return f"{base}_{extension[1:]}" if keep_extension and extension else base


def output_names(found: Sequence[Tuple[str, str]], names: Optional[OutputNames] = None) -> List[str]:
    """The ``<name>`` of each (image path, the folder it was found in, or "" for a file given by itself),
    claimed in ``names`` (a new :class:`OutputNames` by default)."""
    names = names or OutputNames()
    plain = [_stem(path, root, False) for path, root in found]
    shared = {name for name, count in Counter(plain).items() if count > 1}
    return [names.claim(_stem(path, root, True) if name in shared else name)
            for (path, root), name in zip(found, plain)]


def judge(score: float, threshold: float) -> str:
    """:data:`ANOMALOUS` when the score is above the threshold, else :data:`NORMAL`."""
    return ANOMALOUS if score > threshold else NORMAL


class ScoresWriter:
    """Writes ``scores.csv`` row by row to a temporary file that replaces the final name only when
    every row is written (:meth:`open`), so an interrupted run leaves the previous file intact."""

    def __init__(self, handle, header: bool = True):
        self._writer = csv.writer(handle)
        if header:
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


class ScoresAppender(ScoresWriter):
    """Appends rows to ``scores.csv`` a batch at a time (:meth:`commit`: flushed and synced), so that an
    interrupted run keeps every batch it finished; :func:`scored_images` reads them back for a re-run."""

    def __init__(self, path: str):
        self.path = path
        fresh = not os.path.isfile(path)
        self._handle = open(path, "a", newline="")
        super().__init__(self._handle, header=fresh)

    def commit(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self.commit()
        self._handle.close()

    def __enter__(self) -> "ScoresAppender":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def scored_images(path: str, flag: str = "--out") -> List[str]:
    """The images of an existing ``scores.csv`` in order (none when it does not exist).  A last row that a
    killed run left unfinished (no line end) is cut off the file first; UserError when it is not a
    scores file."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
    if os.path.getsize(path) == 0:   # killed before its header was written
        os.remove(path)
        return []
    return read_scores(path, flag)["image"].tolist()


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
