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

from datasets import AnomalyDataset, Sample, get_setting, setting_from_args, test_samples, training_samples
from datasets.anomaly_source import SyntheticAnomalyDataset, choose_anomaly_source
from models.extractor import (FeatureExtractor, build_extractor, build_extractor_from_args, check_weights_path,
                              is_vit, set_amp)
from models.resad import ResAD
from utils import io, run_record
from utils.errors import UserError
from utils.baseline import run_knn_baseline
from utils.evaluation import RunOutputs, evaluate, summary_line, write_baseline, write_evaluation
from utils.history import TrainingHistory, check_tensorboard
from utils.runtime import resolve_device
from utils.seed import rng_state, seed_everything, set_rng_state
from utils.loaders import make_loader
from utils.training import Trainer, TrainReferencePool, train_one_epoch

CHECKPOINT_FORMAT = "resad-checkpoint-1"


# Options that shape the trained model (an --eval_only run takes them from the checkpoint).
MODEL_OPTIONS = ("num_embeddings", "coupling_layers", "clamp_alpha", "pos_embed_dim", "flow_arch", "residual")


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
    if getattr(args, "eval_only", False):
        return evaluate_checkpoint(args, shots, run_names, extractor)
    if getattr(args, "checkpoint", None):
        raise UserError(f"--checkpoint {args.checkpoint}: only used with --eval_only; "
                        "add --eval_only to evaluate it, or use --resume to continue training")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    setting = setting_from_args(args)
    outputs = {k: RunOutputs(io.check_writable(os.path.join(args.checkpoint_path, run_names[k])), run_names[k])
               for k in shots}

    # Check every input before spending time on training.
    test_sets = {c: test_samples(setting.target, args.test_dataset_dir, c) for c in setting.unseen_classes}
    if getattr(args, "baseline", None):  # training-free: no training data, no model
        extractor = set_amp(extractor or build_extractor_from_args(args, device), getattr(args, "amp", "none"))
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
    _check_shots(args, shots)
    check_tensorboard(getattr(args, "tensorboard", None))
    normals = _normals_by_class(stage_samples[1])
    fewest = min(normals.items(), key=lambda kv: len(kv[1]))
    if args.train_ref_shot > min(len(fewest[1]), args.train_ref_pool):
        raise UserError(f"--train_ref_shot {args.train_ref_shot}: class '{fewest[0]}' has "
                        f"{len(fewest[1])} normal training images and the pool holds {args.train_ref_pool}; "
                        "lower --train_ref_shot")
    if args.batch_size > len(stage_samples[1]):
        raise UserError(f"--batch_size {args.batch_size}: larger than the {len(stage_samples[1])} normal training "
                        "images of the seen classes; lower --batch_size")

    if extractor is None:
        check_weights_path(args.backbone, args.backbone_weights)
    io.check_reference_dirs(args.test_ref_feature_dir, setting.unseen_classes)
    if extractor is None:
        extractor = build_extractor_from_args(args, device)
    set_amp(extractor, getattr(args, "amp", "none"))
    banks = _load_banks(args, setting.unseen_classes, extractor, shots, device)
    if max(extractor.channels) > 512:
        print(f"building the flows: {len(extractor.channels)} levels x {args.coupling_layers} coupling layers on "
              f"{max(extractor.channels)} channels (a random rotation each, seconds apiece on a CPU; once per run)")
    model = build_model(args, extractor.channels).to(device)
    trainer = Trainer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, best, last_tables, resumed_from, baseline = 0, {}, {}, None, {}

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
        resumed_from = path

    # The run record and the training history (kept up to the checkpoint on resume).
    run_record.write_run_records({k: outputs[k].path("_run.json") for k in shots},
                                 run_record.describe_run(args, device, setting.source, setting.target,
                                                         stage_samples, test_sets), resumed_from, start_epoch)
    histories = {k: TrainingHistory(outputs[k], getattr(args, "tensorboard", None), start_epoch) for k in shots}

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
        final, started = done == args.epochs, time.time()
        results = evaluate(model, extractor, test_sets, banks, shots, args, device,
                           num_heatmaps=args.num_heatmaps if final else 0, baseline=baseline)
        improved = []
        for k in shots:
            last_tables[k] = write_evaluation(outputs[k], done, results[k], heatmaps=final)
            histories[k].add_evaluation(done, last_tables[k], time.time() - started)
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
        skipped_before, lr = trainer.guard.skipped, trainer.schedulers["flow"].get_last_lr()[0]
        if hasattr(loaders[2].dataset, "set_epoch"):
            loaders[2].dataset.set_epoch(epoch)  # synthetic anomalies: new ones each epoch, reproducibly
        losses = train_one_epoch(trainer, extractor, loaders[2 if stage2 else 1], pool, stage2, generator, device,
                                 desc=f"epoch {epoch + 1}/{args.epochs}")
        for scheduler in trainer.schedulers.values():
            scheduler.step()
        done = epoch + 1
        for k in shots:  # before the checkpoint: a resume drops the rows of epochs after it
            histories[k].add_epoch(done, 2 if stage2 else 1, losses, lr, time.time() - started,
                                   trainer.guard.skipped - skipped_before)
        print(f"epoch {done}/{args.epochs} (stage {2 if stage2 else 1}): "
              + " | ".join(f"{k} loss {v:.4f}" for k, v in losses.items())
              + f" [{time.time() - started:.0f} s]"
              + (f", {trainer.guard.skipped} non-finite steps skipped so far" if trainer.guard.skipped else ""))
        save_latest(done)
        if evaluation_due(done):
            run_evaluation(done)
    for k in shots:
        histories[k].close()
        print(f"results of {outputs[k].name} in {outputs[k].folder}: "
              f"{outputs[k].name}_epoch{args.epochs}_metrics.csv/.json (the last epoch: the reported result), "
              f"{outputs[k].name}_latest.pth, {outputs[k].name}_best.pth (by {args.best_metric}), "
              f"{outputs[k].name}_run.json, {outputs[k].name}_history.csv/.png, heatmaps/")
    return last_tables


def _checkpoint_state(args, extractor, model, trainer, generator, epoch, best) -> dict:
    return {"format": CHECKPOINT_FORMAT, "args": run_record.plain_args(args), "backbone": extractor.name,
            "channels": extractor.channels, "layers": extractor.layers, "epoch": epoch, "model": model.state_dict(),
            "trainer": trainer.state_dict(), "generator": generator.get_state(), "rng": rng_state(),
            "best": dict(best), "trained_on": _trained_on(args, extractor)}


# --------------------------------------------------------------------------- shots and reference banks

def _shots_flag(args: argparse.Namespace) -> str:
    return "--shots" if getattr(args, "shots", None) else "--num_ref_shot"


def _check_shots(args: argparse.Namespace, shots: Sequence[int]) -> None:
    if min(shots) < 1:
        raise UserError(f"{_shots_flag(args)} {min(shots)}: must be at least 1")
    check_at_least(args, 1, "ref_groups")


def _load_banks(args: argparse.Namespace, classes: Sequence[str], extractor: FeatureExtractor,
                shots: Sequence[int], device: torch.device):
    """The reference banks: the first max(shots) shots, or every saved shot when --ref_groups draws from them."""
    describe, flag = extractor.describe(), _shots_flag(args)
    banks = io.load_reference_banks(args.test_ref_feature_dir, classes, describe, max(shots), "cpu", flag)
    if args.ref_groups > 1:
        banks = io.load_reference_banks(args.test_ref_feature_dir, classes, describe, None, "cpu", flag)
    return {c: bank.to(device) for c, bank in banks.items()}


# --------------------------------------------------------------------------- train once, evaluate anywhere

def _trained_on(args: argparse.Namespace, extractor: FeatureExtractor) -> dict:
    """What a checkpoint's model was trained on, as plain values (checked by --eval_only)."""
    setting = setting_from_args(args)
    return {"setting": args.setting, "source": setting.source, "seen_classes": list(setting.seen_classes),
            "backbone": extractor.name, "channels": [int(c) for c in extractor.channels],
            "layers": [int(i) for i in extractor.layers], "feature_levels": len(extractor.channels)}


def _checked_trained_on(ckpt: dict, path: str, setting) -> dict:
    if ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise UserError(f"--checkpoint {path}: not a checkpoint of this project; give a *_latest.pth or *_best.pth")
    trained = ckpt.get("trained_on")
    if trained is None:  # written before the record existed: derive it from the training arguments
        source = get_setting(ckpt["args"]["setting"])
        trained = {"setting": ckpt["args"]["setting"], "source": source.source,
                   "seen_classes": list(source.seen_classes), "backbone": ckpt.get("backbone"),
                   "channels": list(ckpt.get("channels", [])), "feature_levels": len(ckpt.get("channels", []))}
    held = (f"the checkpoint holds a model trained on {trained['source']} ({len(trained['seen_classes'])} seen "
            f"classes, --setting {trained['setting']}, --backbone {trained['backbone']})")
    if trained["source"] != setting.source or sorted(trained["seen_classes"]) != sorted(setting.seen_classes):
        raise UserError(f"--checkpoint {path}: {held}, but --setting {setting.name} is trained on {setting.source} "
                        f"({len(setting.seen_classes)} seen classes); pass a {trained['source']}_to_* setting "
                        f"or a checkpoint trained on {setting.source}")
    overlap = sorted(set(trained["seen_classes"]) & set(setting.unseen_classes)) \
        if trained["source"] == setting.target else []
    if overlap:
        raise UserError(f"--checkpoint {path}: {held}; the classes {', '.join(overlap)} of --setting "
                        f"{setting.name} were seen in training")
    return trained


def _check_reference_backbone(args: argparse.Namespace, classes: Sequence[str], trained: dict, path: str) -> None:
    for class_name in classes:
        backbone = io.read_reference_meta(args.test_ref_feature_dir, class_name).get("backbone")
        if backbone and backbone != trained["backbone"]:
            raise UserError(f"--test_ref_feature_dir {args.test_ref_feature_dir}: features of '{class_name}' were "
                            f"extracted with --backbone {backbone}, but --checkpoint {path} holds a model trained "
                            f"with --backbone {trained['backbone']}; re-extract them with that backbone")


def evaluate_checkpoint(args: argparse.Namespace, shots: Sequence[int], run_names: Dict[int, str],
                        extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """--eval_only: evaluate the model of ``args.checkpoint`` on the unseen classes of ``args.setting``, no training.

    The checkpoint must come from training on the setting's source dataset (and
    seen classes); the backbone and the model options are the checkpoint's,
    the inference options (--fdm_alpha, --smooth_sigma, shots, references) this
    run's.  Result files are named by the checkpoint's epoch; no checkpoint is written.
    """
    if not getattr(args, "checkpoint", None):
        raise UserError("--eval_only: give the trained model with --checkpoint FILE (a *_latest.pth or *_best.pth)")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    setting = setting_from_args(args)
    ckpt = io.load_checkpoint(args.checkpoint, flag="--checkpoint")
    trained = _checked_trained_on(ckpt, args.checkpoint, setting)
    outputs = {k: RunOutputs(io.check_writable(os.path.join(args.checkpoint_path, run_names[k])), run_names[k])
               for k in shots}
    test_sets = {c: test_samples(setting.target, args.test_dataset_dir, c) for c in setting.unseen_classes}
    check_at_least(args, 1, "eval_batch_size")
    check_at_least(args, 0, "num_workers", "num_heatmaps")
    _check_shots(args, shots)
    _check_reference_backbone(args, setting.unseen_classes, trained, args.checkpoint)
    if extractor is None:
        layers = trained.get("layers") or ckpt.get("layers")
        chosen = {}
        if layers:  # the checkpoint's levels: ViT blocks, or the first N stages of a CNN
            chosen = dict(blocks=layers) if is_vit(trained["backbone"]) else dict(levels=len(layers))
        extractor = build_extractor(trained["backbone"], args.backbone_weights, device=device, **chosen)
    set_amp(extractor, getattr(args, "amp", "none"))
    if extractor.name != trained["backbone"] or list(extractor.channels) != list(trained["channels"]):
        raise UserError(f"--checkpoint {args.checkpoint}: holds a model trained with --backbone {trained['backbone']} "
                        f"(channels {trained['channels']}), this run uses {extractor.name}; pass that --backbone")
    banks = _load_banks(args, setting.unseen_classes, extractor, shots, device)
    saved = argparse.Namespace(**{**vars(args), **{key: ckpt["args"][key] for key in MODEL_OPTIONS
                                                   if key in ckpt["args"]}})
    model = build_model(saved, extractor.channels).to(device)
    model.load_state_dict(ckpt["model"])
    epoch = int(ckpt.get("epoch", 0))
    print(f"{args.setting}: evaluating {args.checkpoint} (trained on {trained['source']}, --setting "
          f"{trained['setting']}, epoch {epoch}) on {len(setting.unseen_classes)} unseen classes of "
          f"{setting.target}, backbone {extractor.name}, device {device}")
    results = evaluate(model, extractor, test_sets, banks, shots, args, device, num_heatmaps=args.num_heatmaps)
    tables = {}
    for k in shots:
        tables[k] = write_evaluation(outputs[k], epoch, results[k], heatmaps=True)
        print(summary_line(f"{outputs[k].name} (checkpoint epoch {epoch})", tables[k]))
        print(f"results of {outputs[k].name} in {outputs[k].folder}: {outputs[k].name}_epoch{epoch}_metrics.csv/.json")
    return tables
