"""``--baseline knn``: evaluate the training-free kNN baseline alone on the unseen classes (docs/method.md §6)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from datasets import Sample
from models.anomaly_map import ANOMALY_MAP_RECIPES, KNN_LABELS, normalized_baseline
from models.calibration import calibrate_baseline
from models.extractor import FeatureExtractor
from models.knn_baseline import KnnAccumulator
from models.matching import ReferenceBank
from utils import distributed
from utils.report.results import summary_line, write_knn_only
from utils.run.config import EvalConfig, RunConfig
from utils.run.evaluation import ClassEvaluation, ClassScores, knn_result
from utils.run.loaders import make_loader
from utils.run.preflight import KNN, prepare
from utils.stages import staged


def evaluate_baseline(config: RunConfig, extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """Evaluate the baseline and write ``<run>_baseline.csv/.json`` (and its per-image scores) per number of shots."""
    inputs = prepare(config, KNN, extractor)
    if not distributed.current().primary:   # under torchrun: rank 0 alone (no model, the cheap run)
        distributed.barrier()
        return {}
    results = knn_metrics(inputs.extractor, inputs.test_sets, inputs.banks, config.evaluation, inputs.device,
                          config.num_workers)
    tables = {}
    for k, per_class in results.items():
        out = inputs.outputs[k]
        tables[k] = write_knn_only(out, per_class)
        for name, table in tables[k].groupby("Map", sort=False):
            print(summary_line(f"{out.name} {KNN_LABELS[name]} ({k} shots)", table))
        print(f"written to {out.knn_only_csv()} (.json) and {out.knn_only_scores_csv()}")
    distributed.barrier()
    return tables


@torch.no_grad()
def knn_metrics(extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]], banks: Dict[str, ReferenceBank],
                config: EvalConfig, device: torch.device, num_workers: int = 0) -> Dict[int, Dict[str, ClassEvaluation]]:
    """The kNN baseline per number of shots and class (the first k shots of each bank): raw and, when the
    run's map standardizes, under its rule (``config.normalization``'s statistics); the rows are
    ``knn``/``knn_normalized`` of :attr:`ClassEvaluation.knn`."""
    results: Dict[int, Dict[str, ClassEvaluation]] = {k: {} for k in config.shots}
    rule = normalized_baseline(ANOMALY_MAP_RECIPES[config.anomaly_map])
    for class_name, samples in test_sets.items():
        knn = KnnAccumulator(config.shots)
        labels, masks = [], []
        loader = make_loader(samples, extractor, config.batch_size, num_workers)
        for batch in tqdm(staged(loader, "loading"), total=len(loader), desc=f"kNN {class_name}", leave=False,
                          dynamic_ncols=True):
            knn.add(extractor(batch["image"].to(device)), banks[class_name])
            labels.append(batch["label"].numpy())
            masks.append(batch["mask"].squeeze(1).numpy() > 0.5)
        scores = ClassScores({}, np.concatenate(labels), np.concatenate(masks), knn)
        for k in config.shots:
            calibration = None
            if rule is not None and config.normalization == "references":
                calibration = calibrate_baseline(banks[class_name].take(k), extractor.feature_sizes, [rule],
                                                 extractor.image_size, config.smooth_sigma)
            found = knn_result(scores, k, ANOMALY_MAP_RECIPES[config.anomaly_map], extractor, config, calibration)
            results[k][class_name] = ClassEvaluation(found["metrics"]["knn"], [], knn=found["metrics"],
                                                     knn_scores=found["scores"], paths=[s.image for s in samples],
                                                     labels=scores.labels)
    return results
