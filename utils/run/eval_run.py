"""Evaluate a trained checkpoint on a setting's unseen classes, without training ("train once, evaluate anywhere").

The checkpoint must come from training on the setting's source dataset (and seen
classes); the backbone and the model options are the checkpoint's, the inference
options (EFDM strength, smoothing, shots, references) this run's.  Result files are
named by the checkpoint's epoch; no checkpoint is written.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import pandas as pd

from models.extractor import FeatureExtractor
from utils.formats import checkpoint
from utils import distributed
from utils.report.results import evaluation_table, summary_line, write_evaluation
from utils.run.config import RunConfig
from utils.run.evaluation import evaluate
from utils.run.preflight import EVALUATE, prepare


def evaluate_checkpoint(config: RunConfig, path: str,
                        extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """Evaluate the model of the checkpoint ``path``; returns the table per number of shots."""
    inputs = prepare(config, EVALUATE, extractor, checkpoint_path=path)
    state, trained = inputs.checkpoint, inputs.checkpoint["trained_on"]
    model = checkpoint.build_model(state, inputs.extractor, config.evaluation.fdm_alpha, inputs.device)
    epoch = int(state.get("epoch", 0))
    print(f"{inputs.setting.name}: evaluating {path} (trained on {trained['source']}, --setting "
          f"{trained['setting']}, epoch {epoch}) on {len(inputs.setting.unseen_classes)} unseen classes of "
          f"{inputs.setting.target}, backbone {inputs.extractor.name}, device {inputs.device}")
    results = evaluate(model, inputs.extractor, inputs.test_sets, inputs.banks, config.evaluation, inputs.device,
                       config.num_workers, config.seed, num_heatmaps=config.evaluation.num_heatmaps)
    tables = {}
    for k, out in inputs.outputs.items():
        if not distributed.current().primary:   # under torchrun rank 0 writes
            tables[k] = evaluation_table(results[k])
            continue
        tables[k] = write_evaluation(out, epoch, results[k], heatmaps=True)
        print(summary_line(f"{out.name} (checkpoint epoch {epoch})", tables[k]))
        print(f"results of {out.name} in {out.folder}: {os.path.basename(out.metrics_csv(epoch))}/.json")
    return tables
