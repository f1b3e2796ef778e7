"""Evaluation of the unseen classes: anomaly maps, metrics, result files and heat-maps."""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from datasets import AnomalyDataset, Sample
from models.anomaly_map import anomaly_maps
from models.extractor import FeatureExtractor
from models.knn_baseline import KnnAccumulator
from models.residual import ReferenceBank
from models.resad import ResAD
from utils import io
from utils.loaders import make_loader
from utils.failures import f1_max_threshold, failure_cases
from utils.metrics import METRIC_NAMES, compute_metrics

CSV_COLUMNS = ("Class Name",) + METRIC_NAMES


@dataclass
class ClassEvaluation:
    metrics: Dict[str, float]            # mean over the reference groups (the only group when --ref_groups 1)
    heatmaps: List[dict]                 # a few samples: image (S,S,3) in [0,1], mask, map, label, path, value_range,
                                         # role, score, threshold
    group_metrics: List[Dict[str, float]] = field(default_factory=list)  # one per reference group
    baseline: Optional[Dict[str, float]] = None   # the kNN baseline's metrics on the same images (first k shots)

    @property
    def std(self) -> Dict[str, float]:
        """Sample standard deviation of each metric over the reference groups (empty for one group)."""
        return _group_std(self.group_metrics)


def _group_std(groups: Sequence[Dict[str, float]]) -> Dict[str, float]:
    if len(groups) < 2:
        return {}
    values = np.array([[g[m] for m in METRIC_NAMES] for g in groups], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a metric undefined in every group stays nan
        return dict(zip(METRIC_NAMES, np.nanstd(values, axis=0, ddof=1).tolist()))


def reference_groups(bank: ReferenceBank, groups: int, seed: int) -> List[ReferenceBank]:
    """The bank itself, then ``groups - 1`` seeded re-orderings of its shots, all different when possible.

    Cutting a re-ordered bank to its first k shots is a random draw of k of the
    references; the draws of different k in one group are nested.
    """
    generator = torch.Generator().manual_seed(seed)
    orders = [list(range(bank.num_shots))]
    for _ in range(groups - 1):
        for _attempt in range(100):  # a new order while there are new ones to draw
            order = torch.randperm(bank.num_shots, generator=generator).tolist()
            if order not in orders:
                break
        orders.append(order)
    return [bank] + [bank.select_shots(order) for order in orders[1:]]


@torch.inference_mode()
def evaluate(model: ResAD, extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]],
             banks: Dict[str, ReferenceBank], shots: Sequence[int], args: argparse.Namespace,
             device: torch.device, num_heatmaps: int = 0,
             baseline: Optional[dict] = None) -> Dict[int, Dict[str, ClassEvaluation]]:
    """Evaluate every unseen class for every number of shots.

    Per batch the features are extracted once and matched once per reference
    group against the largest bank (:meth:`ResAD.forward_shots`); each k reads
    its nearest references off that matching.  With ``args.ref_groups`` N > 1
    every k is evaluated with N seeded draws of its references (mean and std).
    With ``baseline`` (a dict, kept by the caller across evaluations) the kNN
    baseline's metrics are computed once per (shots, class), on the first k
    shots, and attached to the results.
    """
    model.eval()
    shots = [int(k) for k in shots]
    num_groups = int(getattr(args, "ref_groups", 1))
    results: Dict[int, Dict[str, ClassEvaluation]] = {k: {} for k in shots}
    levels = range(len(model.channels))
    for class_name, samples in test_sets.items():
        loader = make_loader(samples, extractor, args.eval_batch_size, args.num_workers)
        group_banks = reference_groups(banks[class_name], num_groups, args.seed)
        collected = {(g, k): ([[] for _ in levels], [[] for _ in levels]) for g in range(num_groups) for k in shots}
        labels, masks = [], []
        knn = KnnAccumulator([k for k in shots if (k, class_name) not in baseline]) if baseline is not None else None
        knn_banks = {k: banks[class_name].take(k) for k in knn.levels} if knn is not None else {}
        for batch in tqdm(loader, desc=f"eval {class_name}", leave=False, dynamic_ncols=True):
            features = extractor(batch["image"].to(device, non_blocking=True))
            if knn is not None:
                knn.add(features, knn_banks)
            for g, bank in enumerate(group_banks):
                for k, (logps, probs) in model.forward_shots(features, bank, shots).items():
                    for level in levels:
                        collected[g, k][0][level].append(logps[level])
                        collected[g, k][1][level].append(probs[level])
            labels.append(batch["label"].numpy())
            masks.append(batch["mask"].squeeze(1).numpy() > 0.5)
        labels_np, masks_np = np.concatenate(labels), np.concatenate(masks)
        for k in shots:
            groups, heat = [], []
            for g in range(num_groups):
                logps_, probs_ = collected.pop((g, k))
                maps = anomaly_maps([torch.cat(level) for level in logps_], [torch.cat(level) for level in probs_],
                                    size=extractor.image_size, sigma=args.smooth_sigma).numpy()
                groups.append(compute_metrics(maps, labels_np, masks_np, compute_aupro=not args.no_aupro))
                if g == 0 and num_heatmaps:
                    heat = _failure_heatmaps(samples, maps, labels_np, masks_np, extractor, num_heatmaps)
                del maps
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = {m: float(np.nanmean([grp[m] for grp in groups])) for m in METRIC_NAMES}
            if knn is not None and k in knn.levels:
                baseline[(k, class_name)] = compute_metrics(
                    knn.maps(k, extractor.image_size, args.smooth_sigma).numpy(), labels_np, masks_np,
                    compute_aupro=not args.no_aupro)
            results[k][class_name] = ClassEvaluation(
                mean, heat, groups, baseline=baseline.get((k, class_name)) if baseline is not None else None)
    return results


def _failure_heatmaps(samples: Sequence[Sample], maps: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                      extractor: FeatureExtractor, count: int) -> List[dict]:
    """The worst miss, worst false alarm and top anomalous image of a class (images re-read from disk)."""
    scores = maps.max(axis=(1, 2))
    threshold = f1_max_threshold(labels, scores)
    chosen = failure_cases(labels, scores, count)
    dataset = AnomalyDataset([samples[i] for i, _ in chosen], image_size=extractor.image_size,
                             mean=extractor.mean, std=extractor.std)
    value_range = (float(maps.min()), float(maps.max()))
    return [dict(image=_denormalize(dataset[j]["image"], extractor), mask=masks[i], map=maps[i].copy(),
                 label=int(labels[i]), path=samples[i].image, value_range=value_range, role=role,
                 score=float(scores[i]), threshold=threshold)
            for j, (i, role) in enumerate(chosen)]


def _denormalize(image: torch.Tensor, extractor: FeatureExtractor) -> np.ndarray:
    mean = torch.tensor(extractor.mean).view(3, 1, 1)
    std = torch.tensor(extractor.std).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def results_table(per_class: Dict[str, ClassEvaluation]) -> pd.DataFrame:
    """One row per class and a Mean row; ``<metric> std`` columns when several reference groups were evaluated.

    The Mean row's std is the std over the groups of the class-averaged metric.
    """
    rows = [{"Class Name": name, **ev.metrics, **{f"{m} std": v for m, v in ev.std.items()}}
            for name, ev in per_class.items()]
    evaluations = list(per_class.values())
    with_std = any(ev.std for ev in evaluations)
    columns = list(CSV_COLUMNS) + ([f"{m} std" for m in METRIC_NAMES] if with_std else [])
    frame = pd.DataFrame(rows, columns=columns)
    mean = frame[list(METRIC_NAMES)].mean(axis=0, skipna=True).to_dict()
    if with_std:
        num_groups = min(len(ev.group_metrics) for ev in evaluations)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            group_means = [{m: float(np.nanmean([ev.group_metrics[g][m] for ev in evaluations]))
                            for m in METRIC_NAMES} for g in range(num_groups)]
        mean.update({f"{m} std": v for m, v in _group_std(group_means).items()})
    return pd.concat([frame, pd.DataFrame([{"Class Name": "Mean", **mean}])], ignore_index=True)


def metrics_table(per_class: Dict[str, Dict[str, float]]) -> pd.DataFrame:
    """One row per class and a ``Mean`` row, in the CSV columns, from plain metric dicts."""
    return results_table({name: ClassEvaluation(metrics, []) for name, metrics in per_class.items()})


def summary_line(tag: str, table: pd.DataFrame) -> str:
    mean = table.iloc[-1]

    def value(metric: str) -> str:
        std = f" +- {mean[metric + ' std']:.4f}" if f"{metric} std" in table.columns else ""
        return f"{mean[metric]:.4f}{std}"

    return (f"{tag}: image AUROC {value('Image AUC')} | pixel AUROC {value('Pixel AUC')} | "
            f"AUPRO {value('Pixel AUPRO')} (mean over {len(table) - 1} classes)")


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
    metric_columns = [c for c in table.columns if c != "Class Name"]
    io.save_csv(out.path(f"_epoch{epoch}_metrics.csv"), table)
    io.save_json(out.path(f"_epoch{epoch}_metrics.json"),
                 {"run": out.name, "epoch": epoch,
                  "classes": {r["Class Name"]: {m: r[m] for m in metric_columns} for _, r in table.iterrows()}})
    plots.plot_class_metric(table, "Pixel AUC", out.path(f"_epoch{epoch}_pixel_auroc.png"),
                            title=f"{out.name}, epoch {epoch}: pixel AUROC per class")
    if heatmaps:
        for class_name, ev in per_class.items():
            for item in ev.heatmaps:
                stem = os.path.splitext(os.path.basename(item["path"]))[0]
                kind = os.path.basename(os.path.dirname(item["path"]))
                if np.isfinite(item["threshold"]):
                    verdict = "flagged" if item["score"] >= item["threshold"] else "passed"
                    judged = f"{verdict} at the class's F1-max threshold {item['threshold']:.3f}"
                else:
                    judged = "(no F1-max threshold: the class lacks normal or anomalous images)"
                plots.save_heatmap(
                    os.path.join(out.folder, "heatmaps", f"{class_name}_{item['role']}_{kind}_{stem}.png"), **item,
                    title=f"{out.name}: {class_name} / {item['role']} ({kind}/{stem})\n"
                          f"image score {item['score']:.3f} {judged}")
    return table


def write_baseline(out: RunOutputs, epoch: int, per_class: Dict[str, ClassEvaluation]) -> Optional[pd.DataFrame]:
    """``<run>_epoch<E>_baseline.csv``: the kNN baseline's row per class beside ResAD's; None without one."""
    metrics = {name: ev.baseline for name, ev in per_class.items() if ev.baseline is not None}
    if not metrics:
        return None
    table = metrics_table(metrics)
    io.save_csv(out.path(f"_epoch{epoch}_baseline.csv"), table)
    return table
