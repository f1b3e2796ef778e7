"""Evaluation of the unseen classes: anomaly maps, metrics, result files and heat-maps."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from datasets import Sample
from models.anomaly_map import anomaly_maps
from models.extractor import FeatureExtractor
from models.knn_baseline import KnnAccumulator
from models.residual import ReferenceBank
from models.resad import ResAD
from utils import io
from utils.loaders import make_loader
from utils.metrics import METRIC_NAMES, compute_metrics

CSV_COLUMNS = ("Class Name",) + METRIC_NAMES


@dataclass
class ClassEvaluation:
    metrics: Dict[str, float]
    heatmaps: List[dict]   # a few samples: image (S,S,3) in [0,1], mask, map, label, path, value_range
    baseline: Optional[Dict[str, float]] = None   # the kNN baseline's metrics on the same images


@torch.inference_mode()
def evaluate(model: ResAD, extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]],
             banks: Dict[str, ReferenceBank], shots: Sequence[int], args: argparse.Namespace,
             device: torch.device, num_heatmaps: int = 0,
             baseline: Optional[dict] = None) -> Dict[int, Dict[str, ClassEvaluation]]:
    """Evaluate every unseen class for every number of shots (features are extracted once per batch).

    With ``baseline`` (a dict, kept by the caller across evaluations) the kNN
    baseline's metrics are computed once per (shots, class) and attached to the results.
    """
    model.eval()
    results: Dict[int, Dict[str, ClassEvaluation]] = {k: {} for k in shots}
    for class_name, samples in test_sets.items():
        loader = make_loader(samples, extractor, args.eval_batch_size, args.num_workers)
        keep = _heatmap_indices(samples, num_heatmaps)
        per_shot = {k: ([[] for _ in model.channels], [[] for _ in model.channels]) for k in shots}
        labels, masks, kept = [], [], {}
        bank_views = {k: banks[class_name].take(k) for k in shots}
        knn = KnnAccumulator([k for k in shots if (k, class_name) not in baseline]) if baseline is not None else None
        offset = 0
        for batch in tqdm(loader, desc=f"eval {class_name}", leave=False, dynamic_ncols=True):
            images = batch["image"]
            features = extractor(images.to(device, non_blocking=True))
            if knn is not None:
                knn.add(features, {k: bank_views[k] for k in knn.levels})
            for k in shots:
                logps, probs = model(features, bank_views[k])
                for level in range(len(model.channels)):
                    per_shot[k][0][level].append(logps[level])
                    per_shot[k][1][level].append(probs[level])
            labels.append(batch["label"].numpy())
            masks.append(batch["mask"].squeeze(1).numpy() > 0.5)
            for i in range(images.shape[0]):
                if offset + i in keep:
                    kept[offset + i] = images[i]
            offset += images.shape[0]
        labels_np, masks_np = np.concatenate(labels), np.concatenate(masks)
        for k in shots:
            logps = [torch.cat(level) for level in per_shot[k][0]]
            probs = [torch.cat(level) for level in per_shot[k][1]]
            maps = anomaly_maps(logps, probs, size=extractor.image_size, sigma=args.smooth_sigma).numpy()
            metrics = compute_metrics(maps, labels_np, masks_np, compute_aupro=not args.no_aupro)
            heat = [dict(image=_denormalize(kept[i], extractor), mask=masks_np[i], map=maps[i],
                         label=int(labels_np[i]), path=samples[i].image,
                         value_range=(float(maps.min()), float(maps.max()))) for i in sorted(kept)]
            if knn is not None and k in knn.levels:
                baseline[(k, class_name)] = compute_metrics(
                    knn.maps(k, extractor.image_size, args.smooth_sigma).numpy(), labels_np, masks_np,
                    compute_aupro=not args.no_aupro)
            results[k][class_name] = ClassEvaluation(
                metrics, heat, baseline=baseline.get((k, class_name)) if baseline is not None else None)
    return results


def _heatmap_indices(samples: Sequence[Sample], count: int) -> set:
    anomalous = [i for i, s in enumerate(samples) if s.label]
    normal = [i for i, s in enumerate(samples) if not s.label]
    return set((anomalous[: max(count - 1, 0)] + normal[:1])[:count]) if count else set()


def _denormalize(image: torch.Tensor, extractor: FeatureExtractor) -> np.ndarray:
    mean = torch.tensor(extractor.mean).view(3, 1, 1)
    std = torch.tensor(extractor.std).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def results_table(per_class: Dict[str, ClassEvaluation]) -> pd.DataFrame:
    return metrics_table({name: ev.metrics for name, ev in per_class.items()})


def metrics_table(per_class: Dict[str, Dict[str, float]]) -> pd.DataFrame:
    """One row per class and a ``Mean`` row, in the CSV columns."""
    rows = [{"Class Name": name, **metrics} for name, metrics in per_class.items()]
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    mean = frame[list(METRIC_NAMES)].mean(axis=0, skipna=True)
    return pd.concat([frame, pd.DataFrame([{"Class Name": "Mean", **mean.to_dict()}])], ignore_index=True)


def summary_line(tag: str, table: pd.DataFrame) -> str:
    mean = table.iloc[-1]
    return (f"{tag}: image AUROC {mean['Image AUC']:.4f} | pixel AUROC {mean['Pixel AUC']:.4f} | "
            f"AUPRO {mean['Pixel AUPRO']:.4f} (mean over {len(table) - 1} classes)")


@dataclass
class RunOutputs:
    """File names of one evaluated configuration (one number of shots)."""
    folder: str
    name: str

    def path(self, suffix: str) -> str:
        return os.path.join(self.folder, f"{self.name}{suffix}")


def write_evaluation(out: RunOutputs, epoch: int, per_class: Dict[str, ClassEvaluation], heatmaps: bool) -> pd.DataFrame:
    from utils import plots

    table = results_table(per_class)
    io.save_csv(out.path(f"_epoch{epoch}_metrics.csv"), table)
    io.save_json(out.path(f"_epoch{epoch}_metrics.json"),
                 {"run": out.name, "epoch": epoch,
                  "classes": {r["Class Name"]: {m: r[m] for m in METRIC_NAMES} for _, r in table.iterrows()}})
    plots.plot_class_metric(table, "Pixel AUC", out.path(f"_epoch{epoch}_pixel_auroc.png"),
                            title=f"{out.name}, epoch {epoch}: pixel AUROC per class")
    if heatmaps:
        for class_name, ev in per_class.items():
            for item in ev.heatmaps:
                stem = os.path.splitext(os.path.basename(item["path"]))[0]
                kind = os.path.basename(os.path.dirname(item["path"]))
                plots.save_heatmap(os.path.join(out.folder, "heatmaps", f"{class_name}_{kind}_{stem}.png"), **item,
                                   title=f"{class_name} / {kind} / {stem}")
    return table


def write_baseline(out: RunOutputs, epoch: int, per_class: Dict[str, ClassEvaluation]) -> Optional[pd.DataFrame]:
    """``<run>_epoch<E>_baseline.csv``: the kNN baseline's row per class beside ResAD's; None without one."""
    metrics = {name: ev.baseline for name, ev in per_class.items() if ev.baseline is not None}
    if not metrics:
        return None
    table = metrics_table(metrics)
    io.save_csv(out.path(f"_epoch{epoch}_baseline.csv"), table)
    return table
