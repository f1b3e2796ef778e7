"""``--baseline knn``: evaluate the training-free kNN baseline alone on the unseen classes (docs/method.md §6)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from datasets import Sample
from models.anomaly_map import image_scores
from models.extractor import FeatureExtractor
from models.knn_baseline import KnnAccumulator
from models.matching import ReferenceBank
from utils.metrics import compute_metrics
from utils.report.results import summary_line, write_knn_only
from utils.run.config import EvalConfig, RunConfig
from utils.run.loaders import make_loader
from utils.run.preflight import KNN, prepare
from utils.stages import stage, staged


def evaluate_baseline(config: RunConfig, extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """Evaluate the baseline and write ``<run>_baseline.csv/.json`` per number of shots."""
    inputs = prepare(config, KNN, extractor)
    results = knn_metrics(inputs.extractor, inputs.test_sets, inputs.banks, config.evaluation, inputs.device,
                          config.num_workers)
    tables = {}
    for k, per_class in results.items():
        out = inputs.outputs[k]
        tables[k] = write_knn_only(out, per_class)
        print(summary_line(f"{out.name} kNN baseline ({k} shots)", tables[k]))
        print(f"written to {out.knn_only_csv()} (.json)")
    return tables


@torch.no_grad()
def knn_metrics(extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]], banks: Dict[str, ReferenceBank],
                config: EvalConfig, device: torch.device, num_workers: int = 0) -> Dict[int, Dict[str, Dict[str, float]]]:
    """Metrics of the kNN baseline per number of shots and class (the first k shots of each bank)."""
    results: Dict[int, Dict[str, Dict[str, float]]] = {k: {} for k in config.shots}
    for class_name, samples in test_sets.items():
        knn = KnnAccumulator(config.shots)
        labels, masks = [], []
        loader = make_loader(samples, extractor, config.batch_size, num_workers)
        for batch in tqdm(staged(loader, "loading"), total=len(loader), desc=f"kNN {class_name}", leave=False,
                          dynamic_ncols=True):
            knn.add(extractor(batch["image"].to(device)), banks[class_name])
            labels.append(batch["label"].numpy())
            masks.append(batch["mask"].squeeze(1).numpy() > 0.5)
        for k in config.shots:
            maps = knn.maps(k, extractor.image_size, config.smooth_sigma).numpy()
            with stage("metrics (incl. AUPRO)"):
                results[k][class_name] = compute_metrics(maps, np.concatenate(labels), np.concatenate(masks),
                                                         image_scores(maps, config.image_score).numpy(),
                                                         compute_aupro=config.aupro)
    return results
