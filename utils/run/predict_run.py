"""``predict.py``: anomaly scores, labels and maps of new images of one class, from a trained checkpoint
and k normal references, without labels (docs/method.md §11).

:func:`prepare_prediction` checks every input before time is spent (checkpoint, images, references,
output folder, backbone weights), then loads the :class:`utils.run.predictor.Scorer`.  :func:`predict` then
scores the images:

* ``--normalization references`` (the default): one pass.  Every image is scored on its own with the
  class's calibration, and each batch's rows are appended to ``scores.csv`` as it finishes; a re-run
  with the same ``--out`` skips the images already scored; ``--images -`` reads image paths from standard
  input as they come.
* ``--normalization set``: the images of the run are one set whose statistics normalise every map, in
  the three passes of :mod:`utils.run.prediction`; ``scores.csv`` is written whole at the end.
"""
from __future__ import annotations

import io
import os
import select
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from torch.utils.data import default_collate
from tqdm import tqdm

from datasets import Sample
from datasets.files import walk_image_files
from models.extractor import FeatureExtractor
from utils import distributed
from utils.atomic import check_writable, ensure_dir
from utils.distributed import Ranks
from utils.errors import UserError
from utils.formats.predictions import (OutputNames, PredictionOutputs, ScoresAppender, output_names, read_scores,
                                       scored_images)
from utils.report import run_record
from utils.report.plots import PredictionHeatmaps
from utils.run.config import PredictConfig
from utils.run.prediction import (ReadableImages, heatmap_title, image_batches, input_image, prediction_record,
                                  rank_batches, save_map, save_record, set_passes)
from utils.run.predictor import CLASS, Scorer, check_references, load_scorer
from utils.seed import seed_everything

STDIN = "-"  # --images -: image paths on standard input, one per line


@dataclass
class PredictionInputs:
    """Everything a prediction run needs, checked."""
    config: PredictConfig
    scorer: Scorer
    samples: List[Sample]                # the images to score (empty with --images -)
    names: List[str]                     # per image its output name (utils.formats.predictions)
    claimed: OutputNames                 # every output name taken (--images - claims more as paths come)
    outputs: PredictionOutputs
    references: List[str]                # the reference images' real paths (never scored)
    failures: Dict[int, str] = field(default_factory=dict)  # image index -> why it could not be read

    @property
    def kind(self) -> str:
        return self.scorer.kind

    @property
    def streaming(self) -> bool:
        return self.config.images == (STDIN,)


def own_outputs(out: str) -> List[str]:
    """The folders of ``out`` that a prediction run writes images into (never images to score)."""
    outputs = PredictionOutputs(out)
    return [os.path.join(os.path.abspath(os.path.dirname(path)), "") for path in (outputs.heatmap("x"),
                                                                                   outputs.raw_map("x"))]


def list_images(paths: Tuple[str, ...], out: str, flag: str = "--images") -> List[Tuple[str, str]]:
    """(image, the folder it was found in or "" for a file given by itself) of every folder (searched
    recursively, the output folder's heat-maps and maps left out) and file of ``paths``; UserError for a
    missing path or no image at all."""
    found, skipped = [], own_outputs(out)
    for path in paths:
        if os.path.isdir(path):
            images = [p for p in walk_image_files(path)
                      if not any(os.path.abspath(p).startswith(folder) for folder in skipped)]
            if not images:
                raise UserError(f"{flag} {path}: the folder holds no images (.png/.jpg/.jpeg/.bmp/.tif, searched "
                                "recursively, the heat-maps of --out left out); give a folder of images or image "
                                "files")
            found += [(image, path) for image in images]
        elif os.path.isfile(path):
            found.append((path, ""))
        else:
            raise UserError(f"{flag} {path}: no such file or folder; check the path")
    if not found:
        raise UserError(f"{flag}: no images given; give a folder of images or image files")
    unique = {}
    for image, root in found:  # an image given twice (a file and its folder, nested folders) is scored once
        unique.setdefault(os.path.abspath(image), (image, root))
    return list(unique.values())


def prepare_prediction(config: PredictConfig, extractor: Optional[FeatureExtractor] = None) -> PredictionInputs:
    """Check every input, then load the scorer (the backbone, unless ``extractor`` is given, the references,
    the model and, under the references' normalisation, the class's calibration, kept in ``--out``)."""
    seed_everything(config.seed)
    if STDIN in config.images and (len(config.images) > 1 or config.normalization != "references"):
        raise UserError("--images -: reads image paths from standard input alone, and scores each on its own "
                        "(--normalization references); give no other --images, or a folder")
    if STDIN in config.images and distributed.launched():
        raise UserError("--images -: one stream of paths is read by one process; run predict.py without torchrun")
    found = [] if config.images == (STDIN,) else list_images(config.images, config.out)
    checked = check_references(config)
    check_writable(config.out, "--out")
    scorer = load_scorer(config, extractor, calibration_dir=_calibration_dir(config), checked=checked)
    references = {os.path.realpath(p) for p in scorer.references.get("images", [])}
    kept = [(image, root) for image, root in found if os.path.realpath(image) not in references]
    if len(kept) < len(found):
        print(f"note: {len(found) - len(kept)} of the images are the references themselves (their features are "
              "in the bank, at distance 0); they are not scored")
        if not kept:
            raise UserError(f"--images {' '.join(config.images)}: holds only the reference images; give other images")
    if scorer.ranks.active:
        distributed.check_same({"arguments": config.arguments, "images": kept,
                                "identity": scorer.calibration_record.get("identity")}, "the prediction")
    claimed = OutputNames()
    samples = [Sample(path, 0, (), CLASS) for path, _ in kept]
    return PredictionInputs(config, scorer, samples, output_names(kept, claimed), claimed,
                            PredictionOutputs(config.out), sorted(references))


def _calibration_dir(config: PredictConfig) -> Optional[str]:
    """Where the class's calibration is kept: ``--out`` (only under the references' normalisation)."""
    return config.out if config.normalization == "references" else None


def predict(config: PredictConfig, extractor: Optional[FeatureExtractor] = None) -> dict:
    """Score, label and map the images of ``config``; returns the run record."""
    created = not os.path.isdir(config.out)
    try:
        inputs = prepare_prediction(config, extractor)
        scorer, started = inputs.scorer, time.perf_counter()
        print(f"predict: {'images from standard input' if inputs.streaming else f'{len(inputs.samples)} images'}, "
              f"{scorer.bank.num_shots} references ({scorer.references['source']}), backbone {scorer.extractor.name} "
              f"(--resize {scorer.extractor.resize}, the checkpoint's), map {config.anomaly_map}, image score "
              f"{config.image_score}, normalization {config.normalization}, device {scorer.device}")
        ensure_dir(config.out, "--out")
        record = _stream(inputs, started) if config.normalization == "references" else set_passes(inputs, started)
    except BaseException:
        if created and distributed.current().primary and os.path.isdir(config.out) and not _results_in(config.out):
            _remove_tree(config.out)   # a run that scored nothing leaves no folder behind
        raise
    counts, total = record["images"], record["seconds"]["total"]
    print(f"predict: {counts.get('anomalous', 0)} anomalous, {counts.get('normal', 0)} normal, "
          f"{counts.get('failed', 0)} failed of {counts.get('count', 0)} images ({total:.1f} s); results in {config.out}: "
          "scores.csv, predict_run.json" + (", heatmaps/" if config.heatmaps else "")
          + (", maps/" if config.save_maps else ""))
    return record


def _results_in(folder: str) -> bool:
    return os.path.isfile(PredictionOutputs(folder).scores_csv())


def _remove_tree(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- one image at a time

def run_identity(inputs: PredictionInputs) -> dict:
    """What makes the rows of ``scores.csv`` comparable: a re-run continues them only when this is equal."""
    cfg, scorer = inputs.config, inputs.scorer
    made_from = scorer.calibration_record["identity"]   # the fingerprints, computed once
    return {"model": made_from["model"], "references": made_from["references"],
            "anomaly_map": cfg.anomaly_map, "image_score": cfg.image_score, "normalization": cfg.normalization,
            "fdm_alpha": cfg.fdm_alpha, "smooth_sigma": cfg.smooth_sigma, "threshold": scorer.threshold}


def _resumable(inputs: PredictionInputs, identity: dict) -> List[str]:
    """The images of an earlier run into the same ``--out`` that this one continues; UserError when that
    run was made with another checkpoint, other references or other options."""
    outputs = inputs.outputs
    earlier = scored_images(outputs.scores_csv())
    if not earlier:
        return []
    recorded = run_record.read_record(outputs.run_record()).get("identity")
    if recorded != identity:
        differs = sorted(k for k in identity if (recorded or {}).get(k) != identity[k]) if recorded else ["record"]
        raise UserError(f"--out {inputs.config.out}: holds the scores.csv of another run (other "
                        f"{', '.join(differs)}); give a new --out, or remove its scores.csv to start again")
    return earlier


def _stream(inputs: PredictionInputs, started: float) -> dict:
    """Score every image on its own, appending each batch's rows to ``scores.csv``; returns the run record."""
    cfg, scorer = inputs.config, inputs.scorer
    identity = run_identity(inputs)
    done = _resumable(inputs, identity)
    threshold = scorer.threshold
    print(f"threshold {threshold:.6g}: {_threshold_source(scorer)}")
    if scorer.bank.num_shots == 1 and cfg.threshold is None:
        print("warning: with one reference the threshold is the reference's score against itself, which "
              "underestimates how much normal parts differ (docs/predict.md); give --threshold X or more references")
    record = prediction_record(inputs, identity, {}, {"count": 0}, {})
    record["status"] = "running"
    save_record(inputs, record)
    counts = _score_pending(inputs, done, threshold)
    record.update(status="done", images=dict(counts, inputs=[os.path.abspath(p) for p in cfg.images],
                                             earlier=len(done)))
    total = time.perf_counter() - started
    record["seconds"] = {"total": total}
    record["images_per_second"] = (counts.get("count", 0) - len(done)) / total if total else 0.0
    save_record(inputs, record)
    return record


def _threshold_source(scorer: Scorer) -> str:
    cfg = scorer.config
    if cfg.threshold is not None:
        return "--threshold"
    scores = scorer.calibration.reference_scores[scorer.kind][cfg.image_score]
    rule = "max" if cfg.threshold_quantile is None else f"quantile {cfg.threshold_quantile:g}"
    how = ("each against the other " + str(len(scores) - 1) if len(scores) > 1
           else "the one reference against itself outside each position's neighbourhood")
    return (f"the {rule} of the {len(scores)} references' scores ({how}: " + ", ".join(f"{s:.4g}" for s in scores)
            + f"), calibration {scorer.calibration_record.get('path') or 'in memory'}")


def _score_pending(inputs: PredictionInputs, done: List[str], threshold: float) -> dict:
    """Score the images not yet in ``scores.csv`` batch by batch, appending each batch's rows; the counts of
    every label in ``scores.csv`` (earlier rows too).  Under torchrun rank 0 appends every rank's rows."""
    cfg, scorer = inputs.config, inputs.scorer
    for path in done if inputs.streaming else ():   # the names the earlier rows took, in their order
        inputs.claimed.claim(os.path.splitext(os.path.basename(path))[0])
    held, readable, writer = [], 0, None
    canvas = PredictionHeatmaps(scorer.value_range(), threshold, size=scorer.extractor.image_size) \
        if cfg.heatmaps else None
    try:
        for rows in _rows_in_order(inputs, set(map(os.path.abspath, done)), threshold, canvas):
            readable += sum(1 for row in rows if row[1] is not None)
            held += rows
            if readable and writer is None:
                writer = ScoresAppender(inputs.outputs.scores_csv())
            if writer is not None and held:
                _write_rows(writer, held, threshold)
                held = []
    finally:
        if writer is not None:
            writer.close()
        if canvas is not None:
            canvas.close()
    failed = distributed.broadcast_object(held[0] if held and not readable and not done else None)
    if failed is not None:
        raise UserError(f"--images: none of the {len(held) or 'given'} images could be read (first: {failed[0]}: "
                        f"{failed[2]})")
    return _label_counts(inputs.outputs.scores_csv()) if inputs.scorer.ranks.primary else {}


def _label_counts(path: str) -> dict:
    labels = read_scores(path)["label"] if os.path.isfile(path) else []
    return dict(Counter(labels), count=len(labels))


def _write_rows(writer: ScoresAppender, rows: List[tuple], threshold: float) -> None:
    for path, score, error in rows:
        if score is None:
            writer.failed(path, threshold, error)
        else:
            writer.scored(path, score, threshold)
    writer.commit()


def _rows_in_order(inputs: PredictionInputs, done: set, threshold: float,
                   canvas: Optional[PredictionHeatmaps]) -> Iterator[List[tuple]]:
    """Per batch, in input order, the (path, score or None, error) rows of the images still to score.
    Under torchrun each rank scores every world_size-th batch and rank 0 receives each round's rows in
    order (the other ranks get empty lists)."""
    ranks = inputs.scorer.ranks
    if not ranks.active:
        for paths, names, batch in _pending_batches(inputs, done):
            yield _score_batch(inputs, paths, names, batch, threshold, canvas)
        return
    mine = _pending_batches(inputs, done, ranks)
    batches = -(-_pending_count(inputs, done) // inputs.config.batch_size)
    rounds = -(-batches // ranks.world_size)
    for _ in range(rounds):
        found = next(mine, None)
        rows = _score_batch(inputs, *found, threshold, canvas) if found is not None else []
        gathered = distributed.gather_object(rows, dst=0)
        yield [row for part in gathered for row in part] if ranks.primary else []


def _pending(inputs: PredictionInputs, done: set) -> List[int]:
    return [i for i, s in enumerate(inputs.samples) if os.path.abspath(s.image) not in done]


def _pending_count(inputs: PredictionInputs, done: set) -> int:
    return len(_pending(inputs, done))


def _pending_batches(inputs: PredictionInputs, done: set,
                     ranks: Optional[Ranks] = None) -> Iterator[Tuple[List[str], List[str], dict]]:
    """(paths, output names, batch of :class:`ReadableImages` items) of the images still to score (``ranks``:
    this rank's batches, :func:`utils.run.prediction.rank_batches`)."""
    cfg, extractor = inputs.config, inputs.scorer.extractor
    if not inputs.streaming:
        pending = _pending(inputs, done)
        if len(pending) < len(inputs.samples):
            print(f"{len(inputs.samples) - len(pending)} of {len(inputs.samples)} images are already in "
                  f"{inputs.outputs.scores_csv()}; scoring the other {len(pending)}")
        if ranks is not None:
            pending = [pending[i] for part in rank_batches(len(pending), cfg.batch_size, ranks.rank, ranks.world_size)
                       for i in part]
        samples = [inputs.samples[i] for i in pending]
        names = [inputs.names[i] for i in pending]
        for start, batch in image_batches(samples, extractor, cfg.batch_size, cfg.num_workers, "scoring"):
            end = start + len(batch["path"])
            yield list(batch["path"]), names[start:end], batch
        return
    dataset = ReadableImages([], image_size=extractor.image_size, mean=extractor.mean, std=extractor.std,
                             resize=extractor.resize)
    references = set(inputs.references)
    for paths in stdin_paths(sys.stdin, cfg.batch_size):
        paths = [p for p in paths if os.path.abspath(p) not in done and os.path.realpath(p) not in references]
        if paths:
            dataset.samples = [Sample(p, 0, (), CLASS) for p in paths]
            names = [inputs.claimed.claim(os.path.splitext(os.path.basename(p))[0]) for p in paths]
            yield paths, names, default_collate([dataset[i] for i in range(len(paths))])


def stdin_paths(stream, batch_size: int) -> Iterator[List[str]]:
    """Batches of the non-empty lines of ``stream``: at most ``batch_size``, and a smaller one as soon as no
    further line is waiting, so that an image is scored when it arrives rather than when a batch is full."""
    batch: List[str] = []
    for line in stream:
        if line.strip():
            batch.append(line.strip())
        waiting = _line_waiting(stream)
        if len(batch) >= batch_size or (batch and not waiting):
            yield batch
            batch = []
    if batch:
        yield batch


def _line_waiting(stream) -> bool:
    """Whether more input is ready on ``stream`` now (True for a stream with no file descriptor: a string)."""
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError, io.UnsupportedOperation):
        return True


def _score_batch(inputs: PredictionInputs, paths: List[str], names: List[str], batch: dict, threshold: float,
                 canvas: Optional[PredictionHeatmaps]) -> List[tuple]:
    """(path, score or None, error) per image of a batch; its raw maps and heat-maps written."""
    cfg, scorer = inputs.config, inputs.scorer
    good = [i for i, error in enumerate(batch["error"]) if not error]
    for i, error in enumerate(batch["error"]):
        if error:
            tqdm.write(f"warning: {error}; its row in scores.csv is marked failed", file=sys.stderr)
    scores, maps = scorer.score(batch["image"][good]) if good else (np.zeros(0), None)
    found = dict(zip(good, scores.tolist()))
    for j, i in enumerate(good):
        if cfg.save_maps:
            save_map(inputs.outputs.raw_map(names[i]), maps[j])
        if canvas is not None:
            canvas.save(inputs.outputs.heatmap(names[i]), input_image(batch["image"][i], scorer.extractor),
                        maps[j].numpy(), heatmap_title(names[i], found[i], threshold))
    return [(path, found.get(i), batch["error"][i]) for i, path in enumerate(paths)]
