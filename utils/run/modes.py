"""The three runs a script can ask for, by mode (chosen by :func:`utils.cli.adapters.choose_mode`)."""
from __future__ import annotations

from typing import Dict, Optional

import pandas as pd

from models.extractor import FeatureExtractor
from utils.run.config import RunConfig
from utils.run.eval_run import evaluate_checkpoint
from utils.run.knn import evaluate_baseline
from utils.run.preflight import EVALUATE, KNN, TRAIN
from utils.run.train_run import train


def run(mode: str, config: RunConfig, checkpoint: Optional[str] = None,
        extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """:data:`TRAIN`: train and evaluate; :data:`EVALUATE`: evaluate the model of ``checkpoint``;
    :data:`KNN`: the training-free baseline.  Returns the last table per number of shots."""
    if mode == EVALUATE:
        return evaluate_checkpoint(config, checkpoint, extractor)
    if mode == KNN:
        return evaluate_baseline(config, extractor)
    if mode == TRAIN:
        return train(config, extractor)
    raise ValueError(f"unknown mode {mode!r}")
