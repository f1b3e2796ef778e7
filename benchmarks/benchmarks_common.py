"""Workloads and backbones shared by the benchmarks."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Mapping, Tuple

import pandas as pd
import torch

from datasets import DEMO_SEEN, Sample, generate_demo_dataset, list_fewshot_images
from models.extractor import CNNExtractor, FeatureExtractor, set_amp, set_resize
from utils.cli.adapters import backbone_config
from utils.formats.run_outputs import MAP_COLUMN, RunOutputs, class_rows

# The metric columns of the transfer benchmarks' tables (CSV name -> metrics-table column).
TABLE_COLUMNS = {"image_auroc": "Image AUC", "pixel_auroc": "Pixel AUC", "pixel_ap": "Pixel AP",
                 "aupro": "Pixel AUPRO"}


def mean_rows(tables_dir: str, runs: Mapping[int, str], epoch: int, normalization: str) -> pd.DataFrame:
    """One row per (map, k) of a run's evaluation (``runs``: k -> run name under ``tables_dir``): the Mean rows
    of its maps CSV (resad, the single maps, knn and knn_normalized), and of the baseline's own table when it
    was evaluated beside a checkpoint (``--baseline knn``)."""
    rows = []
    for k, name in runs.items():
        out = RunOutputs(os.path.join(tables_dir, name), name)
        table = pd.read_csv(out.maps_csv(epoch)) if os.path.isfile(out.maps_csv(epoch)) else \
            pd.DataFrame(columns=[MAP_COLUMN])
        if "knn" not in set(table[MAP_COLUMN]) and os.path.isfile(out.knn_only_csv()):
            table = pd.concat([table, pd.read_csv(out.knn_only_csv())], ignore_index=True)
        for method, part in table.groupby(MAP_COLUMN, sort=False):
            mean = part.drop(class_rows(part).index).iloc[-1]
            rows.append({"method": method, "normalization": normalization, "shots": k,
                         **{c: float(mean[m]) for c, m in TABLE_COLUMNS.items()}})
    return pd.DataFrame(rows, columns=["method", "normalization", "shots", *TABLE_COLUMNS])


def build_benchmark_extractor(args: argparse.Namespace, device: torch.device) -> FeatureExtractor:
    """The backbone of ``--backbone`` (``--amp`` and ``--resize`` applied); with ``--random_weights`` any timm CNN, built offline."""
    if not args.random_weights:
        extractor = backbone_config(args).build(device)
    else:
        import timm

        levels = args.feature_levels or 3
        model = timm.create_model(args.backbone, features_only=True, out_indices=tuple(range(1, levels + 1)),
                                  pretrained=False)
        extractor = CNNExtractor(model, args.backbone).to(device)
    set_resize(set_amp(extractor, args.amp), args.resize)
    return extractor


def _cycle(items: List, count: int) -> List:
    return (items * (count // len(items) + 1))[:count] if count else list(items)


def training_workload(args: argparse.Namespace, extractor: FeatureExtractor
                      ) -> Tuple[List[Sample], Dict[str, List[Sample]], str]:
    """Normal training samples (mixed classes) and the same grouped by class, plus a description.

    The images of ``args.data/<cls>/train/good`` when that folder exists (repeated up
    to ``args.images``), else ``args.images`` generated demo images of the seen classes.
    """
    if os.path.isdir(args.data):
        classes = sorted(d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d, "train", "good")))
        samples = [Sample(path, 0, (), c) for c in classes for path in list_fewshot_images(args.data, c)]
        source = os.path.normpath(args.data)
    else:
        per_class = -(-max(args.images, 40) // len(DEMO_SEEN))
        root = generate_demo_dataset(args.generated_dir, n_train=per_class, n_test_good=1, n_test_anomalous=1)
        samples = [Sample(path, 0, (), c) for c in DEMO_SEEN for path in list_fewshot_images(root, c)]
        source = f"generated demo images in {args.generated_dir}"
    samples = _cycle(samples, args.images)
    normals: Dict[str, List[Sample]] = {}
    for s in samples:
        normals.setdefault(s.class_name, []).append(s)
    return samples, normals, source
