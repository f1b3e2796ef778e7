"""Which test images explain a class's failures, and the image threshold they are judged against.

After scoring a class, three kinds of images show a person why it fails: the
highest-scoring anomalous image (what the model finds), the lowest-scoring
anomalous image (the hardest defect) and the highest-scoring normal image (the
most suspicious normal part).  They are named for what they are, not for a
verdict: the lowest-scoring anomalous image is a miss only when it scores below
the class's F1-max threshold, which its title says (flagged or passed).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
from sklearn.metrics import precision_recall_curve

# Order in which the kinds are taken when fewer images than kinds are asked for:
# the failures first.
ROLES = ("lowest-anomalous", "highest-normal", "highest-anomalous")


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image score at which the F1 score of "score >= threshold is anomalous" is largest (nan if undefined)."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.all() or not labels.any():
        return float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2.0 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1])
    f1 = np.where(np.isfinite(f1), f1, -1.0)
    return float(thresholds[int(np.argmax(f1))])


def failure_cases(labels: np.ndarray, scores: np.ndarray, count: int) -> List[Tuple[int, str]]:
    """Up to ``count`` (index, role) pairs: the lowest-scoring anomalous image, the highest-scoring normal one,
    the highest-scoring anomalous one, then the runners-up of each kind in the same rotation; an image is
    chosen once."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    anomalous, normal = np.flatnonzero(labels), np.flatnonzero(~labels)
    queues = {
        "lowest-anomalous": anomalous[np.argsort(scores[anomalous], kind="stable")],
        "highest-normal": normal[np.argsort(-scores[normal], kind="stable")],
        "highest-anomalous": anomalous[np.argsort(-scores[anomalous], kind="stable")],
    }
    chosen: List[Tuple[int, str]] = []
    taken = set()
    depth = 0
    while len(chosen) < count and depth < len(labels):
        for role in ROLES:
            queue = queues[role]
            if depth < len(queue) and int(queue[depth]) not in taken and len(chosen) < count:
                taken.add(int(queue[depth]))
                chosen.append((int(queue[depth]), role))
        depth += 1
    return chosen
