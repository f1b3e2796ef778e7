"""``main.py --baseline knn``: evaluate the training-free kNN baseline alone on the unseen classes."""
from __future__ import annotations

import argparse
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from datasets import Sample
from models.extractor import FeatureExtractor
from models.knn_baseline import KnnAccumulator
from models.residual import ReferenceBank
from utils import io
from utils.evaluation import RunOutputs, metrics_table, summary_line
from utils.loaders import make_loader
from utils.metrics import METRIC_NAMES, compute_metrics


@torch.no_grad()
def evaluate_knn_baseline(extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]],
                          banks: Dict[str, ReferenceBank], shots: Sequence[int], args: argparse.Namespace,
                          device: torch.device) -> Dict[int, Dict[str, Dict[str, float]]]:
    """Metrics of the kNN baseline per number of shots and class."""
    results: Dict[int, Dict[str, Dict[str, float]]] = {k: {} for k in shots}
    for class_name, samples in test_sets.items():
        knn = KnnAccumulator(shots)
        views = {k: banks[class_name].take(k) for k in shots}
        labels, masks = [], []
        for batch in tqdm(make_loader(samples, extractor, args.eval_batch_size, args.num_workers),
                          desc=f"kNN {class_name}", leave=False, dynamic_ncols=True):
            knn.add(extractor(batch["image"].to(device)), views)
            labels.append(batch["label"].numpy())
            masks.append(batch["mask"].squeeze(1).numpy() > 0.5)
        for k in shots:
            maps = knn.maps(k, extractor.image_size, args.smooth_sigma).numpy()
            results[k][class_name] = compute_metrics(maps, np.concatenate(labels), np.concatenate(masks),
                                                     compute_aupro=not args.no_aupro)
    return results


def run_knn_baseline(outputs: Dict[int, RunOutputs], *args, **kwargs) -> Dict[int, pd.DataFrame]:
    """Evaluate the baseline (arguments of :func:`evaluate_knn_baseline`) and write
    ``<run>_baseline.csv/.json`` per number of shots."""
    tables = {}
    for k, per_class in evaluate_knn_baseline(*args, **kwargs).items():
        table = tables[k] = metrics_table(per_class)
        io.save_csv(outputs[k].path("_baseline.csv"), table)
        io.save_json(outputs[k].path("_baseline.json"),
                     {"run": outputs[k].name, "baseline": "knn",
                      "classes": {r["Class Name"]: {m: r[m] for m in METRIC_NAMES} for _, r in table.iterrows()}})
        print(summary_line(f"{outputs[k].name} kNN baseline ({k} shots)", table))
        print(f"written to {outputs[k].path('_baseline.csv')} (.json)")
    return tables
