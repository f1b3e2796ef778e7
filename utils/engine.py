"""Training and evaluation loops, shared by main.py, main_ib.py and main_extended_multi_shot.py.

:func:`fit` is the whole run: it checks the inputs (datasets, reference
features, output folder) before any training, trains on the seen classes of a
setting in two stages, evaluates the unseen classes after every ``eval_freq``
epochs for one or several numbers of reference shots, writes the result files
and checkpoints, and resumes from a checkpoint when asked.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import pandas as pd
import torch

from datasets import AnomalyDataset, Sample, setting_from_args, test_samples, training_samples
from datasets.anomaly_source import SyntheticAnomalyDataset, choose_anomaly_source
from models.extractor import FeatureExtractor, build_extractor_from_args
from models.resad import ResAD
from utils import io
from utils.errors import UserError
from utils.baseline import run_knn_baseline
from utils.evaluation import RunOutputs, evaluate, summary_line, write_baseline, write_evaluation
from utils.runtime import resolve_device
from utils.seed import rng_state, seed_everything, set_rng_state
from utils.loaders import make_loader
from utils.training import Trainer, TrainReferencePool, train_one_epoch

CHECKPOINT_FORMAT = "resad-checkpoint-1"


def build_model(args: argparse.Namespace, channels: Sequence[int]) -> ResAD:
    return ResAD(channels, num_embeddings=args.num_embeddings, coupling_layers=args.coupling_layers,
                 clamp_alpha=args.clamp_alpha, pos_embed_dim=args.pos_embed_dim, flow_arch=args.flow_arch,
                 residual_mode=args.residual, fdm_alpha=args.fdm_alpha)


def check_at_least(args: argparse.Namespace, minimum: int, *flags: str) -> None:
    """UserError naming the first of ``flags`` whose value is below ``minimum``."""
    for flag in flags:
        if getattr(args, flag) < minimum:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least {minimum}")


# --------------------------------------------------------------------------- the whole run

def _normals_by_class(samples: Sequence[Sample]) -> Dict[str, List[Sample]]:
    groups: Dict[str, List[Sample]] = {}
    for s in samples:
        if not s.label:
            groups.setdefault(s.class_name, []).append(s)
    return groups


def _check_resume(ckpt: dict, args: argparse.Namespace, extractor: FeatureExtractor, path: str) -> None:
    saved = ckpt.get("args", {})
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--resume {path}: not a training checkpoint of this project; give a *_latest.pth")
    if saved.get("setting") != args.setting:
        raise UserError(f"--resume {path}: the checkpoint is for --setting {saved.get('setting')}, "
                        f"this run is {args.setting}; pass the matching checkpoint or setting")
    if ckpt.get("backbone") != extractor.name or list(ckpt.get("channels", [])) != extractor.channels:
        raise UserError(f"--resume {path}: the checkpoint was trained with --backbone {ckpt.get('backbone')}, "
                        f"this run uses {extractor.name}; pass the same --backbone")
    if list(ckpt.get("layers", extractor.layers)) != extractor.layers:
        raise UserError(f"--resume {path}: the checkpoint was trained on the backbone's layers {ckpt['layers']}, "
                        f"this run uses {extractor.layers}; pass the same --feature_levels / --feature_blocks")
    for key in ("coupling_layers", "flow_arch", "pos_embed_dim", "num_embeddings", "residual"):
        if key in saved and saved[key] != getattr(args, key):
            raise UserError(f"--resume {path}: the checkpoint has --{key} {saved[key]}, this run "
                            f"{getattr(args, key)}; use the same model options")



def fit(args: argparse.Namespace, shots: Sequence[int], run_names: Dict[int, str],
        extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """Train on the seen classes of ``args.setting`` and evaluate the unseen ones for each number of shots.

    ``extractor`` may be passed when the caller already built it from ``args``.
    Returns the last evaluation's table per number of shots.
    """
    device = resolve_device(args.device)
    seed_everything(args.seed)
    setting = setting_from_args(args)
    outputs = {k: RunOutputs(io.check_writable(os.path.join(args.checkpoint_path, run_names[k])), run_names[k])
               for k in shots}

    # Check every input before spending time on training.
    test_sets = {c: test_samples(setting.target, args.test_dataset_dir, c) for c in setting.unseen_classes}
    if getattr(args, "baseline", None):  # training-free: no training data, no model
        extractor = extractor or build_extractor_from_args(args, device)
        banks = io.load_reference_banks(args.test_ref_feature_dir, setting.unseen_classes, extractor.describe(),
                                        max(shots), device)
        return run_knn_baseline(outputs, extractor, test_sets, banks, shots, args, device)
    stage_samples = {1: training_samples(setting.source, args.train_dataset_dir, setting.seen_classes, stage=1)}
    anomaly_source, stage_samples[2] = choose_anomaly_source(getattr(args, "anomaly_source", None), setting,
                                                             args.train_dataset_dir)
    check_at_least(args, 1, "train_ref_shot", "batch_size", "eval_batch_size", "epochs", "eval_freq",
                   "train_ref_pool", "coupling_layers", "num_embeddings", "max_bad_steps")
    check_at_least(args, 0, "num_workers", "stage1_epochs", "num_heatmaps")
    if args.pos_embed_dim < 4 or args.pos_embed_dim % 4:
        raise UserError(f"--pos_embed_dim {args.pos_embed_dim}: must be a positive multiple of 4")
    if min(shots) < 1:
        raise UserError(f"--num_ref_shot {min(shots)}: must be at least 1")
    normals = _normals_by_class(stage_samples[1])
    fewest = min(normals.items(), key=lambda kv: len(kv[1]))
    if args.train_ref_shot > min(len(fewest[1]), args.train_ref_pool):
        raise UserError(f"--train_ref_shot {args.train_ref_shot}: class '{fewest[0]}' has "
                        f"{len(fewest[1])} normal training images and the pool holds {args.train_ref_pool}; "
                        "lower --train_ref_shot")
    if args.batch_size > len(stage_samples[1]):
        raise UserError(f"--batch_size {args.batch_size}: larger than the {len(stage_samples[1])} normal training "
                        "images of the seen classes; lower --batch_size")

    io.check_reference_dirs(args.test_ref_feature_dir, setting.unseen_classes)
    if extractor is None:
        extractor = build_extractor_from_args(args, device)
    extractor.autocast_dtype = torch.bfloat16 if getattr(args, "amp", "none") == "bf16" else None
    banks = io.load_reference_banks(args.test_ref_feature_dir, setting.unseen_classes, extractor.describe(), max(shots), device)
    if max(extractor.channels) > 512:
        print(f"building the flows: {len(extractor.channels)} levels x {args.coupling_layers} coupling layers on "
              f"{max(extractor.channels)} channels (a random rotation each, seconds apiece on a CPU; once per run)")
    model = build_model(args, extractor.channels).to(device)
    trainer = Trainer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, best, last_tables, baseline = 0, {}, {}, {}

    if args.resume:
        path = args.resume if args.resume != "auto" else outputs[shots[0]].path("_latest.pth")
        ckpt = io.load_checkpoint(path)
        _check_resume(ckpt, args, extractor, path)
        model.load_state_dict(ckpt["model"])
        trainer.load_state_dict(ckpt["trainer"])
        generator.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"])
        start_epoch, best = ckpt["epoch"], ckpt.get("best", {})
        for out in outputs.values():
            io.remove_stale_temporaries(out.folder)
        print(f"resumed from {path} after epoch {start_epoch}")

    pool = TrainReferencePool(extractor, normals, args.train_ref_pool, args.eval_batch_size, args.num_workers, device)
    stage2_dataset = AnomalyDataset if anomaly_source == "real" else functools.partial(
        SyntheticAnomalyDataset, fraction=args.synthetic_fraction, families=args.synthetic_defects, seed=args.seed)
    loaders = {stage: make_loader(stage_samples[stage], extractor, args.batch_size, args.num_workers,
                                  shuffle=True, drop_last=True, generator=generator,
                                  dataset_class=AnomalyDataset if stage == 1 else stage2_dataset,
                                  # set_epoch must reach the workers of a synthetic stage 2: no persistent ones
                                  persistent=device.type == "cuda" and (stage == 1 or anomaly_source == "real"))
               for stage in (1, 2)}
    print(f"{args.setting}: {len(setting.seen_classes)} seen classes ({len(stage_samples[1])} normal / "
          f"{len(stage_samples[2])} stage-2 training images), {len(setting.unseen_classes)} unseen classes, "
          f"backbone {extractor.name} {extractor.channels}, device {device}")

    def evaluation_due(done: int) -> bool:
        return done % args.eval_freq == 0 or done == args.epochs

    def save_latest(done: int) -> None:
        state = _checkpoint_state(args, extractor, model, trainer, generator, done, best)
        for k in shots:
            io.save_checkpoint(outputs[k].path("_latest.pth"), state)

    def run_evaluation(done: int) -> None:
        final = done == args.epochs
        results = evaluate(model, extractor, test_sets, banks, shots, args, device,
                           num_heatmaps=args.num_heatmaps if final else 0, baseline=baseline)
        improved = []
        for k in shots:
            last_tables[k] = write_evaluation(outputs[k], done, results[k], heatmaps=final)
            print(summary_line(f"{outputs[k].name} epoch {done}", last_tables[k]))
            knn_table = write_baseline(outputs[k], done, results[k])
            if knn_table is not None:
                print(summary_line(f"{outputs[k].name} kNN baseline", knn_table))
            value = float(last_tables[k].iloc[-1][args.best_metric])
            if math.isfinite(value) and value > best.get(k, {}).get("value", -math.inf):
                best[k] = {"metric": args.best_metric, "value": value, "epoch": done}
                improved.append(k)
        if improved:
            state = _checkpoint_state(args, extractor, model, trainer, generator, done, best)
            for k in improved:
                io.save_checkpoint(outputs[k].path("_best.pth"), state)
            save_latest(done)  # keep the best record of the latest checkpoint current

    # A run interrupted between its checkpoint and its evaluation evaluates first.
    if start_epoch and evaluation_due(start_epoch) and not all(
            os.path.isfile(outputs[k].path(f"_epoch{start_epoch}_metrics.csv")) for k in shots):
        run_evaluation(start_epoch)

    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        pool.refresh(generator)
        if epoch == start_epoch:
            print(f"training reference pool: up to {args.train_ref_pool} images per seen class, "
                  f"{pool.memory_bytes() / 2 ** 20:.0f} MiB on {device}")
        stage2 = epoch >= args.stage1_epochs
        if hasattr(loaders[2].dataset, "set_epoch"):
            loaders[2].dataset.set_epoch(epoch)  # synthetic anomalies: new ones each epoch, reproducibly
        losses = train_one_epoch(trainer, extractor, loaders[2 if stage2 else 1], pool, stage2, generator, device,
                                 desc=f"epoch {epoch + 1}/{args.epochs}")
        for scheduler in trainer.schedulers.values():
            scheduler.step()
        done = epoch + 1
        print(f"epoch {done}/{args.epochs} (stage {2 if stage2 else 1}): "
              + " | ".join(f"{k} loss {v:.4f}" for k, v in losses.items())
              + f" [{time.time() - started:.0f} s]"
              + (f", {trainer.guard.skipped} non-finite steps skipped so far" if trainer.guard.skipped else ""))
        save_latest(done)
        if evaluation_due(done):
            run_evaluation(done)
    for k in shots:
        print(f"results of {outputs[k].name} in {outputs[k].folder}: "
              f"{outputs[k].name}_epoch{args.epochs}_metrics.csv/.json (the last epoch: the reported result), "
              f"{outputs[k].name}_latest.pth, {outputs[k].name}_best.pth (by {args.best_metric}), heatmaps/")
    return last_tables


def _checkpoint_state(args, extractor, model, trainer, generator, epoch, best) -> dict:
    return {"format": CHECKPOINT_FORMAT, "args": vars(args).copy(), "backbone": extractor.name,
            "channels": extractor.channels, "layers": extractor.layers, "epoch": epoch, "model": model.state_dict(),
            "trainer": trainer.state_dict(), "generator": generator.get_state(), "rng": rng_state(),
            "best": dict(best)}
