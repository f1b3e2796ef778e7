"""Writing and printing the results of an evaluation: the metrics tables (CSV and JSON), the
per-class pixel-AUROC plot, the failure heat-maps and the one-line summaries."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd

from utils.atomic import save_csv, save_json
from utils.formats.run_outputs import (CLASS_COLUMN, IMAGE_COLUMNS, MAP_COLUMN, RunOutputs, image_label, mean_row,
                                       results_table, write_table)
from utils.report import plots


def summary_line(tag: str, table: pd.DataFrame) -> str:
    """``<tag>: image AUROC x | pixel AUROC y | AUPRO z (mean over N classes)`` from the Mean row."""
    mean = mean_row(table)

    def value(metric: str) -> str:
        std = f" +- {mean[metric + ' std']:.4f}" if f"{metric} std" in table.columns else ""
        return f"{mean[metric]:.4f}{std}"

    if not pixel_metrics(table):
        return f"{tag}: image AUROC {value('Image AUC')} | image labels only (mean over {len(table) - 1} classes)"
    return (f"{tag}: image AUROC {value('Image AUC')} | pixel AUROC {value('Pixel AUC')} | "
            f"AUPRO {value('Pixel AUPRO')} (mean over {len(table) - 1} classes)")


def pixel_metrics(table: pd.DataFrame) -> bool:
    """Whether any class of a metrics table has pixel metrics (not: image labels only, docs/method.md §5.5)."""
    return bool(np.isfinite(table["Pixel AUC"].to_numpy(dtype=float)).any())


def evaluation_table(per_class) -> pd.DataFrame:
    """The metrics table of :class:`utils.run.evaluation.ClassEvaluation` results per class."""
    return results_table({name: ev.metrics for name, ev in per_class.items()},
                         {name: ev.group_metrics for name, ev in per_class.items()})


def write_evaluation(out: RunOutputs, epoch: int, per_class, heatmaps: bool) -> pd.DataFrame:
    """``<run>_epoch<E>_metrics.csv/.json``, ``_pixel_auroc.png`` and, with ``heatmaps``, the failure heat-maps."""
    table = evaluation_table(per_class)
    write_table(out.metrics_csv(epoch), out.metrics_json(epoch), table, run=out.name, epoch=epoch)
    if pixel_metrics(table):
        plots.plot_class_metric(table, "Pixel AUC", out.pixel_auroc_png(epoch),
                                title=f"{out.name}, epoch {epoch}: pixel AUROC per class")
    else:   # image labels only: the image metric, in the same file
        plots.plot_class_metric(table, "Image AUC", out.pixel_auroc_png(epoch),
                                title=f"{out.name}, epoch {epoch}: image AUROC per class (image labels only)")
    write_single_maps(out, epoch, per_class)
    write_image_scores(out.scores_csv(epoch), per_class, "scores")
    if heatmaps:
        for class_name, ev in per_class.items():
            for item in ev.heatmaps:
                _save_heatmap(out, class_name, item)
    return table


def maps_table(metrics: Dict[str, Dict[str, Dict[str, float]]]) -> Optional[pd.DataFrame]:
    """A ``Map`` column and, per map, the rows of :func:`results_table` (classes, then Mean), from
    ``metrics[class][map]``; None without maps."""
    names = list(dict.fromkeys(name for per_map in metrics.values() for name in per_map))
    if not names:
        return None
    tables = [results_table({c: per_map[name] for c, per_map in metrics.items() if name in per_map})
              for name in names]
    for name, table in zip(names, tables):
        table.insert(1, MAP_COLUMN, name)
    return pd.concat(tables, ignore_index=True)


def single_maps_table(per_class) -> Optional[pd.DataFrame]:
    """:func:`maps_table` of the single maps of :class:`utils.run.evaluation.ClassEvaluation` results."""
    return maps_table({name: ev.maps for name, ev in per_class.items() if ev.maps})


def write_image_scores(path: str, per_class, attribute: str) -> None:
    """One row per test image (class, path, label) and a column per map of ``ev.<attribute>`` (the image
    scores of each map); nothing when no class has scores."""
    frames = []
    for class_name, ev in per_class.items():
        scores = getattr(ev, attribute)
        if scores:
            frames.append(pd.DataFrame({CLASS_COLUMN: class_name, IMAGE_COLUMNS[1]: ev.paths,
                                        IMAGE_COLUMNS[2]: np.asarray(ev.labels, dtype=int),
                                        **{name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}}))
    if frames:
        save_csv(path, pd.concat(frames, ignore_index=True), float_format="%.9g")


def write_single_maps(out: RunOutputs, epoch: int, per_class) -> None:
    """``<run>_epoch<E>_maps.csv``: the metrics of each single map beside the result (docs/method.md §2.9)."""
    table = single_maps_table(per_class)
    if table is not None:
        write_table(out.maps_csv(epoch), None, table)


def heatmap_title(run: str, class_name: str, item: dict) -> str:
    """The title of a failure heat-map: the run, class, role and image, and the verdict at the class's F1-max
    threshold (an image at the threshold is flagged)."""
    if np.isfinite(item["threshold"]):
        verdict = "flagged" if item["score"] >= item["threshold"] else "passed"
        judged = f"{verdict} at the class's F1-max threshold {item['threshold']:.3f}"
    else:
        judged = "(no F1-max threshold: the class lacks normal or anomalous images)"
    kind, stem = image_label(item["path"])
    return f"{run}: {class_name} / {item['role']} ({kind}/{stem})\nimage score {item['score']:.3f} {judged}"


def _save_heatmap(out: RunOutputs, class_name: str, item: dict) -> None:
    plots.save_heatmap(out.heatmap(class_name, item["role"], item["path"]), **item,
                       title=heatmap_title(out.name, class_name, item))


def write_knn_beside(out: RunOutputs, epoch: int, per_class) -> Optional[pd.DataFrame]:
    """``<run>_epoch<E>_baseline.csv`` (a ``Map`` column: the baseline raw and under the run's rule) and its
    per-image scores beside ResAD's; None without a baseline."""
    table = maps_table({name: ev.knn for name, ev in per_class.items() if ev.knn})
    if table is None:
        return None
    write_table(out.baseline_csv(epoch), None, table)
    write_image_scores(out.baseline_scores_csv(epoch), per_class, "knn_scores")
    return table


def write_knn_only(out: RunOutputs, per_class) -> pd.DataFrame:
    """``--baseline knn``: ``<run>_baseline.csv/.json`` (as :func:`write_knn_beside`) and its per-image scores."""
    table = maps_table({name: ev.knn for name, ev in per_class.items()})
    save_csv(out.knn_only_csv(), table)
    maps = {name: {r[CLASS_COLUMN]: {m: r[m] for m in part.columns if m not in (CLASS_COLUMN, MAP_COLUMN)}
                   for _, r in part.iterrows()} for name, part in table.groupby(MAP_COLUMN, sort=False)}
    save_json(out.knn_only_json(), {"run": out.name, "baseline": "knn", "classes": maps["knn"], "maps": maps})
    write_image_scores(out.knn_only_scores_csv(), per_class, "knn_scores")
    return table
