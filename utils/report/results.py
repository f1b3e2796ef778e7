"""Writing and printing the results of an evaluation: the metrics tables (CSV and JSON), the
per-class pixel-AUROC plot, the failure heat-maps and the one-line summaries."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd

from utils.formats.run_outputs import RunOutputs, image_label, mean_row, results_table, write_table

MAP_COLUMN = "Map"
from utils.report import plots


def summary_line(tag: str, table: pd.DataFrame) -> str:
    """``<tag>: image AUROC x | pixel AUROC y | AUPRO z (mean over N classes)`` from the Mean row."""
    mean = mean_row(table)

    def value(metric: str) -> str:
        std = f" +- {mean[metric + ' std']:.4f}" if f"{metric} std" in table.columns else ""
        return f"{mean[metric]:.4f}{std}"

    return (f"{tag}: image AUROC {value('Image AUC')} | pixel AUROC {value('Pixel AUC')} | "
            f"AUPRO {value('Pixel AUPRO')} (mean over {len(table) - 1} classes)")


def evaluation_table(per_class) -> pd.DataFrame:
    """The metrics table of :class:`utils.run.evaluation.ClassEvaluation` results per class."""
    return results_table({name: ev.metrics for name, ev in per_class.items()},
                         {name: ev.group_metrics for name, ev in per_class.items()})


def write_evaluation(out: RunOutputs, epoch: int, per_class, heatmaps: bool) -> pd.DataFrame:
    """``<run>_epoch<E>_metrics.csv/.json``, ``_pixel_auroc.png`` and, with ``heatmaps``, the failure heat-maps."""
    table = evaluation_table(per_class)
    write_table(out.metrics_csv(epoch), out.metrics_json(epoch), table, run=out.name, epoch=epoch)
    plots.plot_class_metric(table, "Pixel AUC", out.pixel_auroc_png(epoch),
                            title=f"{out.name}, epoch {epoch}: pixel AUROC per class")
    write_single_maps(out, epoch, per_class)
    if heatmaps:
        for class_name, ev in per_class.items():
            for item in ev.heatmaps:
                _save_heatmap(out, class_name, item)
    return table


def single_maps_table(per_class) -> Optional[pd.DataFrame]:
    """A ``Map`` column and, per map, the rows of :func:`results_table` (classes, then Mean); None without maps."""
    names = next((list(ev.maps) for ev in per_class.values() if ev.maps), None)
    if names is None:
        return None
    tables = [results_table({c: ev.maps[name] for c, ev in per_class.items() if name in ev.maps})
              for name in names]
    for name, table in zip(names, tables):
        table.insert(1, MAP_COLUMN, name)
    return pd.concat(tables, ignore_index=True)


def write_single_maps(out: RunOutputs, epoch: int, per_class) -> None:
    """``<run>_epoch<E>_maps.csv``: the metrics of each single map beside the result (docs/method.md §2.9)."""
    table = single_maps_table(per_class)
    if table is not None:
        write_table(out.maps_csv(epoch), None, table)


def _save_heatmap(out: RunOutputs, class_name: str, item: dict) -> None:
    if np.isfinite(item["threshold"]):
        verdict = "flagged" if item["score"] >= item["threshold"] else "passed"
        judged = f"{verdict} at the class's F1-max threshold {item['threshold']:.3f}"
    else:
        judged = "(no F1-max threshold: the class lacks normal or anomalous images)"
    kind, stem = image_label(item["path"])
    plots.save_heatmap(out.heatmap(class_name, item["role"], item["path"]), **item, title=f"{out.name}: {class_name} / {item['role']} ({kind}/{stem})\n"
                                           f"image score {item['score']:.3f} {judged}")


def write_knn_beside(out: RunOutputs, epoch: int, per_class) -> Optional[pd.DataFrame]:
    """``<run>_epoch<E>_baseline.csv``: the kNN baseline's row per class beside ResAD's; None without one."""
    metrics = {name: ev.knn for name, ev in per_class.items() if ev.knn is not None}
    if not metrics:
        return None
    table = results_table(metrics)
    write_table(out.baseline_csv(epoch), None, table)
    return table


def write_knn_only(out: RunOutputs, per_class: Dict[str, Dict[str, float]]) -> pd.DataFrame:
    """``--baseline knn``: ``<run>_baseline.csv/.json``."""
    table = results_table(per_class)
    write_table(out.knn_only_csv(), out.knn_only_json(), table, run=out.name, baseline="knn")
    return table
