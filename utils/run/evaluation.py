"""Evaluation of the unseen classes: anomaly maps and metrics for every number of shots
(docs/method.md §2.8, §5, §7); the result files are written by :mod:`utils.report.results`."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets import AnomalyDataset, Sample
from datasets.base import has_pixel_labels
from models.anomaly_map import (ANOMALY_MAP_RECIPES, SINGLE_MAPS, image_scores, nearest_levels, needs_nearest,
                                normalized_baseline, resad_maps)
from models.calibration import Calibration, calibrate_model
from models.extractor import FeatureExtractor
from models.knn_baseline import KnnAccumulator
from models.matching import ReferenceBank
from models.resad import LevelScores, ResAD
from utils import distributed
from utils.metrics import METRIC_NAMES, compute_metrics
from utils.report.failures import f1_max_threshold, failure_cases
from utils.run.config import EvalConfig
from utils.run.loaders import make_loader
from utils.stages import stage, staged


@dataclass
class ClassEvaluation:
    metrics: Dict[str, float]            # mean over the reference groups (the only group when ref_groups is 1)
    heatmaps: List[dict]                 # a few samples: image (S,S,3) in [0,1], mask, map, label, path, value_range,
                                         # role, score, threshold
    group_metrics: List[Dict[str, float]] = field(default_factory=list)  # one per reference group
    knn: Optional[Dict[str, Dict[str, float]]] = None  # the kNN baseline's metrics per KNN_MAPS row (first k shots)
    maps: Dict[str, Dict[str, float]] = field(default_factory=dict)  # each single map's metrics (first group)
    scores: Dict[str, np.ndarray] = field(default_factory=dict)      # per map computed: the image scores (first group)
    knn_scores: Dict[str, np.ndarray] = field(default_factory=dict)  # per KNN_MAPS row: the baseline's image scores
    paths: List[str] = field(default_factory=list)                   # the test images, in the order of the scores
    labels: Optional[np.ndarray] = None


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


@dataclass
class ClassScores:
    """What the test images of one class leave after scoring: per (group, k) the model's per-level
    outputs (:class:`LevelScores` of per-level lists of batches), the labels and masks, and the kNN distances."""
    maps: Dict[Tuple[int, int], LevelScores]
    labels: np.ndarray
    masks: np.ndarray
    knn: Optional[KnnAccumulator]


@torch.inference_mode()
def evaluate(model: ResAD, extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]],
             banks: Dict[str, ReferenceBank], config: EvalConfig, device: torch.device, num_workers: int = 0,
             seed: int = 0, num_heatmaps: int = 0,
             knn_cache: Optional[dict] = None) -> Dict[int, Dict[str, ClassEvaluation]]:
    """Evaluate every unseen class for every number of shots of ``config.shots``.

    Per batch the features are extracted once and matched once per reference group
    against the largest bank (:meth:`ResAD.forward_shots`); each k reads its nearest
    references off that matching.  With ``config.ref_groups`` N > 1 every k is evaluated
    with N draws of its references seeded by ``seed`` (mean and std).  The maps are
    normalised by the statistics of the class's test images (``config.normalization`` "set")
    or by the class's calibration from its k references ("references", :mod:`models.calibration`).
    With ``knn_cache`` (a dict, kept by the caller across evaluations: the backbone is frozen)
    the kNN baseline's metrics are computed once per (shots, class), on the first k shots.
    """
    model.eval()
    if distributed.current().active:
        return _evaluate_shared(model, extractor, test_sets, banks, config, device, num_workers, seed, num_heatmaps,
                                knn_cache)
    results: Dict[int, Dict[str, ClassEvaluation]] = {k: {} for k in config.shots}
    for class_name, samples in test_sets.items():
        group_banks = reference_groups(banks[class_name], config.ref_groups, seed)
        knn_shots = [k for k in config.shots if (k, class_name) not in knn_cache] if knn_cache is not None else None
        scores = _score_class(model, extractor, class_name, samples, group_banks, config, device, num_workers,
                              knn_shots)
        for k in config.shots:
            calibrations = _calibrations(model, extractor, group_banks, k, config, scores)
            results[k][class_name] = _class_result(scores, k, class_name, samples, extractor, config,
                                                   num_heatmaps, knn_cache, calibrations)
    return results


@dataclass(frozen=True)
class Slice:
    """A part of a class's test images (``start:stop``) scored by one rank."""
    class_name: str
    index: int
    start: int
    stop: int
    rank: int


def shard_plan(sizes: Dict[str, int], world_size: int, batch_size: int) -> List[Slice]:
    """Spread the classes (``sizes``: images per class) over the ranks, largest first, each to the rank with
    the least work so far; a class larger than a rank's share of all images is cut into slices of whole
    batches (so every slice's batches are those of a one-process run)."""
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    share = ceil_div(sum(sizes.values()), world_size)
    pieces = []
    for class_name, n in sizes.items():
        step = n if n <= share else ceil_div(ceil_div(n, ceil_div(n, share)), batch_size) * batch_size
        pieces += [(class_name, i, start, min(n, start + step)) for i, start in enumerate(range(0, max(n, 1), step))]
    load = [0] * world_size
    plan = []
    for class_name, i, start, stop in sorted(pieces, key=lambda p: -(p[3] - p[2])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += stop - start
        plan.append(Slice(class_name, i, start, stop, rank))
    return sorted(plan, key=lambda u: (list(sizes).index(u.class_name), u.index))


def _evaluate_shared(model: ResAD, extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]],
                     banks: Dict[str, ReferenceBank], config: EvalConfig, device: torch.device, num_workers: int,
                     seed: int, num_heatmaps: int, knn_cache: Optional[dict]) -> Dict[int, Dict[str, ClassEvaluation]]:
    """:func:`evaluate` under torchrun: each rank scores its slices (:func:`shard_plan`), a class cut into
    slices is put together on the rank of its first slice, which computes its maps and metrics exactly as
    one process would, and every rank gets every result (and the kNN cache)."""
    ranks = distributed.current()
    plan = shard_plan({c: len(s) for c, s in test_sets.items()}, ranks.world_size, config.batch_size)
    mine = {}
    for part in (p for p in plan if p.rank == ranks.rank):
        group_banks = reference_groups(banks[part.class_name], config.ref_groups, seed)
        knn_shots = [k for k in config.shots if (k, part.class_name) not in knn_cache] if knn_cache is not None \
            else None
        mine[part] = _on_cpu(_score_class(model, extractor, part.class_name,
                                          test_sets[part.class_name][part.start:part.stop], group_banks, config,
                                          device, num_workers, knn_shots))
    done = {}
    for class_name, samples in test_sets.items():
        parts = [p for p in plan if p.class_name == class_name]
        owner = parts[0].rank
        if len(parts) > 1:
            found = distributed.gather_object([(p.index, mine[p]) for p in parts if p.rank == ranks.rank], dst=owner)
            scores = _joined_slices([s for _, s in sorted(pair for rank_parts in found for pair in rank_parts)
                                     ]) if found else None
        else:
            scores = mine.get(parts[0])
        if ranks.rank == owner:
            group_banks = reference_groups(banks[class_name], config.ref_groups, seed)
            done[class_name] = {k: _class_result(scores, k, class_name, samples, extractor, config, num_heatmaps,
                                                 knn_cache, _calibrations(model, extractor, group_banks, k, config,
                                                                          scores)) for k in config.shots}
    everyone = {c: r for part in distributed.all_gather_object(done) for c, r in part.items()}
    results = {k: {c: everyone[c][k] for c in test_sets} for k in config.shots}
    if knn_cache is not None:
        for k, per_class in results.items():
            for c, ev in per_class.items():
                if ev.knn is not None:
                    knn_cache[(k, c)] = {"metrics": ev.knn, "scores": ev.knn_scores}
    return results


def _on_cpu(scores: ClassScores) -> ClassScores:
    """``scores`` with every tensor on the CPU (to be sent to another rank)."""
    maps = {key: LevelScores(*([[None if t is None else t.cpu() for t in level] for level in field_]
                               for field_ in outputs)) for key, outputs in scores.maps.items()}
    if scores.knn is not None:
        scores.knn.levels = {k: [[m.cpu() for m in batch] for batch in batches] for k, batches in scores.knn.levels.items()}
    return ClassScores(maps, scores.labels, scores.masks, scores.knn)


def _joined_slices(parts: Sequence[ClassScores]) -> ClassScores:
    """One class's :class:`ClassScores` from those of its slices, in image order."""
    first = parts[0]
    maps = {key: LevelScores(*([sum((p.maps[key][f][level] for p in parts), []) for level in range(len(first.maps[key][f]))]
                               for f in range(len(LevelScores._fields))))
            for key in first.maps}
    knn = first.knn
    if knn is not None:
        knn.levels = {k: sum((p.knn.levels[k] for p in parts), []) for k in knn.levels}
    return ClassScores(maps, np.concatenate([p.labels for p in parts]), np.concatenate([p.masks for p in parts]), knn)


def _score_class(model: ResAD, extractor: FeatureExtractor, class_name: str, samples: Sequence[Sample],
                 group_banks: Sequence[ReferenceBank], config: EvalConfig, device: torch.device, num_workers: int,
                 knn_shots: Optional[Sequence[int]]) -> ClassScores:
    levels = range(len(model.channels))
    maps = {(g, k): LevelScores(*([[] for _ in levels] for _ in LevelScores._fields))
            for g in range(len(group_banks)) for k in config.shots}
    labels, masks = [], []
    knn = KnnAccumulator(knn_shots, model.matcher) if knn_shots is not None else None
    kind = ANOMALY_MAP_RECIPES[config.anomaly_map]
    # The nearest-reference search covers the levels the run's map reads, and all of them when the
    # baseline (which reads all) takes its distances from it.
    nearest = nearest_levels([kind] + (["knn"] if knn_shots else []), len(levels)) if needs_nearest(kind) else None
    loader = make_loader(samples, extractor, config.batch_size, num_workers)
    for batch in tqdm(staged(loader, "loading"), total=len(loader), desc=f"eval {class_name}",
                      leave=False, dynamic_ncols=True):
        features = extractor(batch["image"].to(device, non_blocking=True))
        if knn is not None and nearest is None:
            knn.add(features, group_banks[0])
        for g, bank in enumerate(group_banks):
            scored = model.forward_shots(features, bank, config.shots, nearest_levels=nearest)
            if knn is not None and nearest is not None and g == 0:  # the baseline's search is the one just done
                knn.add_found({k: outputs.nearest for k, outputs in scored.items()})
            for k, outputs in scored.items():
                for kept, batch_maps in zip(maps[g, k], outputs):
                    for level in range(len(batch_maps)):   # no levels for the outputs not asked for
                        kept[level].append(batch_maps[level])
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"].squeeze(1).numpy() > 0.5)
    return ClassScores(maps, np.concatenate(labels), np.concatenate(masks), knn)


def _joined(kept: List[list]) -> list:
    """Per level the concatenated batches of one output (None at a level not searched); [] for an output
    not computed."""
    if not any(kept):
        return []
    return [None if level[0] is None else torch.cat(level) for level in kept]


def _map_kinds(config: EvalConfig, group: int, with_nearest: bool, with_knn: bool) -> List[str]:
    """The maps of reference group ``group`` whose statistics an evaluation needs: the run's own and,
    in the first group, the single maps (those of the distances to the nearest reference only when the
    run computed them) and the kNN baseline under the run's rule."""
    kind = ANOMALY_MAP_RECIPES[config.anomaly_map]
    kinds = [kind]
    if group == 0 and config.map_metrics:
        kinds += [name for name in SINGLE_MAPS if with_nearest or not needs_nearest(name)]
    if group == 0 and with_knn and normalized_baseline(kind) is not None:
        kinds.append(normalized_baseline(kind))
    return list(dict.fromkeys(kinds))


def _calibrations(model: ResAD, extractor: FeatureExtractor, group_banks: Sequence[ReferenceBank], k: int,
                  config: EvalConfig, scores: ClassScores) -> Dict[int, Calibration]:
    """Per reference group, the calibration of the class from its first k references (empty under the
    set's statistics)."""
    if config.normalization != "references":
        return {}
    with_nearest = bool(scores.maps[0, k].nearest and scores.maps[0, k].nearest[-1])
    with_knn = scores.knn is not None and k in scores.knn.levels
    with stage("calibration"):
        return {g: calibrate_model(model, bank.take(k), extractor.feature_sizes,
                                   _map_kinds(config, g, with_nearest, with_knn), extractor.image_size,
                                   config.smooth_sigma)
                for g, bank in enumerate(group_banks)}


def _statistics(calibration: Optional[Calibration], kind: str):
    """The statistics of map ``kind``: the calibration's, or None (the set's own)."""
    return calibration.statistics[kind] if calibration is not None else None


def _class_result(scores: ClassScores, k: int, class_name: str, samples: Sequence[Sample],
                  extractor: FeatureExtractor, config: EvalConfig, num_heatmaps: int,
                  knn_cache: Optional[dict], calibrations: Dict[int, Calibration]) -> ClassEvaluation:
    """The metrics of one class at k shots (mean over the reference groups), its heat-maps, its per-image
    scores and its kNN rows."""
    groups, heat, single, image_scores_of = [], [], {}, {}
    kind = ANOMALY_MAP_RECIPES[config.anomaly_map]
    for g in range(config.ref_groups):
        outputs = LevelScores(*(_joined(kept) for kept in scores.maps.pop((g, k))))
        with stage("anomaly maps"):
            maps = resad_maps(outputs, kind, size=extractor.image_size, sigma=config.smooth_sigma,
                              statistics=_statistics(calibrations.get(g), kind)).numpy()
        metrics, found = _metrics(maps, scores, config)
        groups.append(metrics)
        if g == 0:
            image_scores_of["resad"] = found
        if g == 0 and num_heatmaps:
            heat = _failure_heatmaps(samples, maps, scores.labels, scores.masks, extractor, num_heatmaps,
                                     config.image_score)
        del maps
        if g == 0 and config.map_metrics:
            single = _single_map_metrics(outputs, kind, groups[0], scores, extractor, config, calibrations.get(0),
                                         image_scores_of)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {m: float(np.nanmean([grp[m] for grp in groups])) for m in METRIC_NAMES}
    if scores.knn is not None and k in scores.knn.levels:
        knn_cache[(k, class_name)] = knn_result(scores, k, kind, extractor, config, calibrations.get(0))
    knn = knn_cache.get((k, class_name)) if knn_cache is not None else None
    if single and knn is not None:
        single.update(knn["metrics"])
    return ClassEvaluation(mean, heat, groups, knn=knn["metrics"] if knn else None, maps=single,
                           scores=image_scores_of, knn_scores=knn["scores"] if knn else {},
                           paths=[s.image for s in samples], labels=scores.labels)


def knn_result(scores: ClassScores, k: int, kind: str, extractor: FeatureExtractor, config: EvalConfig,
               calibration: Optional[Calibration]) -> dict:
    """The kNN baseline's metrics and image scores of a class (``scores.knn``) at k shots, per row of
    :data:`KNN_MAPS`: raw (§6) and under the rule of the run's map ``kind`` (§6.1) normalised like it
    (``calibration``: the class's, or None for the test set's statistics)."""
    found = {}
    with stage("kNN maps"):
        levels = scores.knn.level_maps(k)
        found["knn"] = scores.knn.maps(k, extractor.image_size, config.smooth_sigma).numpy()
        rule = normalized_baseline(kind)
        if rule is not None:
            found["knn_normalized"] = resad_maps(LevelScores([], [], [], [], nearest=levels), rule,
                                                 size=extractor.image_size, sigma=config.smooth_sigma,
                                                 statistics=_statistics(calibration, rule)).numpy()
    result = {"metrics": {}, "scores": {}}
    for name, maps in found.items():
        result["metrics"][name], result["scores"][name] = _metrics(maps, scores, config)
    return result


def _single_map_metrics(outputs: LevelScores, kind: str, result: Dict[str, float], scores: ClassScores,
                        extractor: FeatureExtractor, config: EvalConfig, calibration: Optional[Calibration],
                        image_scores_of: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """The metrics of each single map of :data:`SINGLE_MAPS` ("resad" is the run's own result); their image
    scores go into ``image_scores_of``."""
    single = {"resad": result}
    for name in SINGLE_MAPS:
        if name == kind:
            single[name], image_scores_of[name] = result, image_scores_of["resad"]
            continue
        if needs_nearest(name) and not (outputs.nearest and outputs.nearest[-1] is not None):
            continue   # a map of the kNN distances only when computed
        with stage("single maps"):
            maps = resad_maps(outputs, name, size=extractor.image_size, sigma=config.smooth_sigma,
                              statistics=_statistics(calibration, name)).numpy()
            single[name], image_scores_of[name] = _metrics(maps, scores, config)
    return single


def _metrics(maps: np.ndarray, scores: ClassScores, config: EvalConfig) -> Tuple[Dict[str, float], np.ndarray]:
    """The metrics of a class's maps, and its image scores."""
    found = image_scores(maps, config.image_score).numpy()
    with stage("metrics (incl. AUPRO)"):
        return compute_metrics(maps, scores.labels, scores.masks, found, compute_aupro=config.aupro), found


def _failure_heatmaps(samples: Sequence[Sample], maps: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                      extractor: FeatureExtractor, count: int, rule: str = "max") -> List[dict]:
    """The lowest-scoring anomalous, highest-scoring normal and highest-scoring anomalous images of a class
    (:func:`utils.report.failures.failure_cases`; images re-read from disk)."""
    scores = image_scores(maps, rule).numpy()
    threshold = f1_max_threshold(labels, scores)
    chosen = failure_cases(labels, scores, count)
    dataset = AnomalyDataset([samples[i] for i, _ in chosen], image_size=extractor.image_size,
                             mean=extractor.mean, std=extractor.std, resize=extractor.resize)
    value_range = (float(maps.min()), float(maps.max()))
    outlined = has_pixel_labels(samples)  # image labels only: no ground truth to outline
    return [dict(image=_denormalize(dataset[j]["image"], extractor), mask=masks[i], map=maps[i].copy(),
                 label=int(labels[i]), path=samples[i].image, value_range=value_range, role=role,
                 score=float(scores[i]), threshold=threshold, pixel_labels=outlined)
            for j, (i, role) in enumerate(chosen)]


def _denormalize(image: torch.Tensor, extractor: FeatureExtractor) -> np.ndarray:
    mean = torch.tensor(extractor.mean).view(3, 1, 1)
    std = torch.tensor(extractor.std).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
