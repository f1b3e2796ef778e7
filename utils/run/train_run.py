"""A training run: train on the seen classes in two stages, evaluate the unseen ones, write everything.

:func:`train` prepares the inputs (:func:`utils.run.preflight.prepare`) and runs a
:class:`TrainingRun`, whose state is explicit: the model and its :class:`Trainer`,
the generator, the epoch to start from, the best evaluation so far, the kNN cache
and the last tables.  Read :meth:`TrainingRun.run` top to bottom.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Dict, Optional

import pandas as pd
import torch

from datasets import AnomalyDataset
from datasets.anomaly_source import SyntheticAnomalyDataset
from models.anomaly_map import KNN_LABELS
from models.extractor import FeatureExtractor
from models.resad import ResAD
from utils import distributed
from utils.atomic import remove_stale_temporaries
from utils.formats import checkpoint
from utils.formats.run_outputs import mean_row
from utils.report import run_record
from utils.report.history import TrainingHistory
from utils.report.results import evaluation_table, summary_line, write_evaluation, write_knn_beside
from utils.run.config import RunConfig
from utils.run.evaluation import evaluate
from utils.run.loaders import make_loader, set_epoch
from utils.run.preflight import TRAIN, RunInputs, prepare
from utils.run.reference_pool import TrainReferencePool
from utils.run.training import Trainer, train_one_epoch
from utils.seed import rng_state, set_rng_state


def train(config: RunConfig, extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """Train on the seen classes of the setting and evaluate the unseen ones for each number of shots;
    returns the last evaluation's table per number of shots."""
    return TrainingRun(prepare(config, TRAIN, extractor)).run()


class TrainingRun:
    """One training run over checked :class:`RunInputs`."""

    def __init__(self, inputs: RunInputs):
        self.inputs, self.config = inputs, inputs.config
        cfg, extractor = self.config, inputs.extractor
        if max(extractor.channels) > 512:
            print(f"building the flows: {len(extractor.channels)} levels x {cfg.model.coupling_layers} coupling "
                  f"layers on {max(extractor.channels)} channels (a random rotation each, seconds apiece on a CPU; "
                  "once per run)")
        self.ranks = distributed.current()
        self.model = ResAD(extractor.channels, cfg.model, fdm_alpha=cfg.evaluation.fdm_alpha).to(inputs.device)
        distributed.broadcast_module(self.model)   # one start for every rank
        self.trainer = Trainer(self.model, cfg.training)
        # This rank's random stream (reference draws, flow mini-batches), and the one all ranks share (the
        # reference pool, the epoch's shuffle): one generator for both in a one-process run.
        self.generator = torch.Generator().manual_seed(cfg.seed + self.ranks.rank)
        self.shared_generator = torch.Generator().manual_seed(cfg.seed) if self.ranks.active else self.generator
        self.start_epoch, self.best, self.last_tables, self.knn_cache = 0, {}, {}, {}
        resumed_from = self._resume(cfg.training.resume) if cfg.training.resume else None
        if self.ranks.primary:
            self._write_run_records(resumed_from)
        self.histories = {k: TrainingHistory(out, cfg.training.tensorboard, self.start_epoch)
                          for k, out in inputs.outputs.items()} if self.ranks.primary else {}
        self.pool = TrainReferencePool(extractor, inputs.training.normals, cfg.training.train_ref_pool,
                                       cfg.evaluation.batch_size, cfg.num_workers, inputs.device)
        self.loaders = self._loaders()
        samples = inputs.training.stage_samples
        print(f"{inputs.setting.name}: {len(inputs.setting.seen_classes)} seen classes ({len(samples[1])} normal / "
              f"{len(samples[2])} stage-2 training images), {len(inputs.setting.unseen_classes)} unseen classes, "
              f"backbone {extractor.name} {extractor.channels}, device {inputs.device}")

    def run(self) -> Dict[int, pd.DataFrame]:
        epochs = self.config.training.epochs
        # A run interrupted between its checkpoint and its evaluation evaluates first.
        if self.start_epoch and self._evaluation_due(self.start_epoch) and \
                not distributed.broadcast_object(self._evaluated(self.start_epoch)):
            self.evaluate(self.start_epoch)
        for epoch in range(self.start_epoch, epochs):
            self.train_epoch(epoch)
            self.save_latest(epoch + 1)
            if self._evaluation_due(epoch + 1):
                self.evaluate(epoch + 1)
        for history in self.histories.values():
            history.close()
        self._print_outputs()
        return self.last_tables

    # ----------------------------------------------------------------------- the steps of run()

    def train_epoch(self, epoch: int) -> None:
        """One epoch: refresh the reference pool, train on the stage's loader, step the schedulers, record."""
        cfg, trainer, started = self.config.training, self.trainer, time.time()
        self.pool.refresh(self.shared_generator)
        if epoch == self.start_epoch:
            print(f"training reference pool: up to {cfg.train_ref_pool} images per seen class, "
                  f"{self.pool.memory_bytes() / 2 ** 20:.0f} MiB on {self.inputs.device}")
        stage = 2 if epoch >= cfg.stage1_epochs else 1
        skipped_before, lr = trainer.guard.skipped, trainer.schedulers["flow"].get_last_lr()[0]
        if hasattr(self.loaders[2].dataset, "set_epoch"):
            self.loaders[2].dataset.set_epoch(epoch)  # synthetic anomalies: new ones each epoch, reproducibly
        set_epoch(self.loaders[stage], epoch)       # several ranks: each its new share of the epoch
        losses = train_one_epoch(trainer, self.inputs.extractor, self.loaders[stage], self.pool, stage == 2,
                                 self.generator, self.inputs.device, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        losses = distributed.mean_values(losses)   # the epoch's losses over every rank
        for scheduler in trainer.schedulers.values():
            scheduler.step()
        seconds = time.time() - started
        for history in self.histories.values():  # before the checkpoint: a resume drops the rows after it
            history.add_epoch(epoch + 1, stage, losses, lr, seconds, trainer.guard.skipped - skipped_before)
        print(f"epoch {epoch + 1}/{cfg.epochs} (stage {stage}): "
              + " | ".join(f"{k} loss {v:.4f}" for k, v in losses.items()) + f" [{seconds:.0f} s]"
              + (f", {trainer.guard.skipped} non-finite steps skipped so far" if trainer.guard.skipped else ""))

    def evaluate(self, done: int) -> None:
        """Evaluate after epoch ``done``: result files, history rows, summaries, and the best checkpoints.
        Under torchrun every rank evaluates its share and gets every result; rank 0 writes."""
        cfg, inputs, started = self.config, self.inputs, time.time()
        final = done == cfg.training.epochs
        results = evaluate(self.model, inputs.extractor, inputs.test_sets, inputs.banks, cfg.evaluation,
                           inputs.device, cfg.num_workers, cfg.seed,
                           num_heatmaps=cfg.evaluation.num_heatmaps if final else 0, knn_cache=self.knn_cache)
        improved = []
        for k, out in inputs.outputs.items():
            table = self.last_tables[k] = evaluation_table(results[k])
            if self.ranks.primary:
                self._write_evaluation(k, done, results[k], final, time.time() - started)
            if self._improves(k, float(mean_row(table)[cfg.training.best_metric]), done):
                improved.append(k)
        if improved:
            state = self._state(done)
            for k in improved:
                self._save(inputs.outputs[k].best_checkpoint(), state)
            self.save_latest(done)  # keep the best record of the latest checkpoint current

    def _write_evaluation(self, k: int, done: int, results, final: bool, seconds: float) -> None:
        out = self.inputs.outputs[k]
        table = write_evaluation(out, done, results, heatmaps=final)
        self.histories[k].add_evaluation(done, table, seconds)
        print(summary_line(f"{out.name} epoch {done}", table))
        knn_table = write_knn_beside(out, done, results)
        for name, part in (knn_table.groupby("Map", sort=False) if knn_table is not None else ()):
            print(summary_line(f"{out.name} {KNN_LABELS[name]}", part))

    def save_latest(self, done: int) -> None:
        state = self._state(done)
        for out in self.inputs.outputs.values():
            self._save(out.latest_checkpoint(), state)

    def _save(self, path: str, state: Optional[dict]) -> None:
        if self.ranks.primary:
            checkpoint.save(path, state)

    # ----------------------------------------------------------------------- helpers

    def _improves(self, k: int, value: float, done: int) -> bool:
        if not math.isfinite(value) or value <= self.best.get(k, {}).get("value", -math.inf):
            return False
        self.best[k] = {"metric": self.config.training.best_metric, "value": value, "epoch": done}
        return True

    def _evaluation_due(self, done: int) -> bool:
        return done % self.config.training.eval_freq == 0 or done == self.config.training.epochs

    def _evaluated(self, done: int) -> bool:
        return all(os.path.isfile(out.metrics_csv(done)) for out in self.inputs.outputs.values())

    def _state(self, epoch: int) -> Optional[dict]:
        """The checkpoint (on rank 0; every rank must call this: it gathers each rank's random states)."""
        inputs = self.inputs
        mine = {"generator": self.generator.get_state(), "rng": rng_state()}
        ranks = distributed.gather_object(mine, dst=0) if self.ranks.active else None
        if not self.ranks.primary:
            return None
        extra = {"shared_generator": self.shared_generator.get_state(), "rank_states": ranks,
                 "distributed": self.ranks.describe()} if self.ranks.active else {}
        return checkpoint.checkpoint_state(
            self.model, self.config.model, checkpoint.trained_on(inputs.setting, inputs.extractor),
            self.config.arguments, epoch=epoch, trainer=self.trainer.state_dict(),
            generator=mine["generator"], rng=mine["rng"], best=dict(self.best), **extra)

    def _resume(self, path: str) -> str:
        """Restore the model, optimizers, generators, random states and best records of a checkpoint.  Each rank
        takes its own random states when the checkpoint holds them (written under as many ranks or more);
        others start theirs from --seed and their rank."""
        if path == "auto":
            path = next(iter(self.inputs.outputs.values())).latest_checkpoint()
        state = checkpoint.load(path)
        checkpoint.check_resume(state, path, self.inputs.setting.name, self.inputs.extractor, self.config.model)
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        saved = state.get("rank_states") or [{"generator": state["generator"], "rng": state["rng"]}]
        rank = self.ranks.rank
        if rank < len(saved):
            self.generator.set_state(saved[rank]["generator"])
            set_rng_state(saved[rank]["rng"])
        if self.ranks.active:
            self.shared_generator.set_state(state.get("shared_generator", state["generator"]))
        self.start_epoch, self.best = state["epoch"], state.get("best", {})
        if self.ranks.primary:
            for out in self.inputs.outputs.values():
                remove_stale_temporaries(out.folder)
        print(f"resumed from {path} after epoch {self.start_epoch}"
              + (f" ({len(saved)} ranks' random states saved, {self.ranks.world_size} ranks now)"
                 if len(saved) != self.ranks.world_size else ""))
        return path

    def _write_run_records(self, resumed_from: Optional[str]) -> None:
        inputs, cfg = self.inputs, self.config
        description = run_record.describe_run(
            cfg.arguments, cfg.seed, inputs.device,
            {"train": cfg.data.train_dataset_dir, "test": cfg.data.test_dataset_dir}, cfg.data.test_ref_feature_dir,
            inputs.setting.source, inputs.setting.target, inputs.training.stage_samples, inputs.test_sets)
        description["distributed"] = self.ranks.describe()
        run_record.write_run_records({k: out.run_record() for k, out in inputs.outputs.items()}, description,
                                     resumed_from, self.start_epoch)

    def _loaders(self) -> dict:
        cfg, training = self.config, self.inputs.training
        synthetic = functools.partial(SyntheticAnomalyDataset, fraction=cfg.training.synthetic_fraction,
                                      families=cfg.training.synthetic_defects, seed=cfg.seed)
        real = training.anomaly_source == "real"
        return {stage: make_loader(training.stage_samples[stage], self.inputs.extractor, cfg.training.batch_size,
                                   cfg.num_workers, shuffle=True, drop_last=True, generator=self.shared_generator,
                                   ranks=self.ranks,
                                   dataset_class=AnomalyDataset if stage == 1 or real else synthetic,
                                   # set_epoch must reach the workers of a synthetic stage 2: no persistent ones
                                   persistent=self.inputs.device.type == "cuda" and (stage == 1 or real))
                for stage in (1, 2)}

    def _print_outputs(self) -> None:
        cfg = self.config
        for out in self.inputs.outputs.values():
            names = [os.path.basename(p) for p in (out.metrics_csv(cfg.training.epochs), out.latest_checkpoint(),
                                                   out.best_checkpoint(), out.run_record(), out.history_csv())]
            print(f"results of {out.name} in {out.folder}: {names[0]}/.json (the last epoch: the reported result), "
                  f"{names[1]}, {names[2]} (by {cfg.training.best_metric}), {names[3]}, {names[4]}/.png, heatmaps/")
