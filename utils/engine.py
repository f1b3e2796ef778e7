"""Training and evaluation loops, shared by main.py, main_ib.py and main_extended_multi_shot.py.

:func:`fit` is the whole run: it checks the inputs (datasets, reference
features, output folder) before any training, trains on the seen classes of a
setting in two stages, evaluates the unseen classes after every ``eval_freq``
epochs for one or several numbers of reference shots, writes the result files
and checkpoints, and resumes from a checkpoint when asked.
"""
from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import AnomalyDataset, Sample, get_setting, test_samples, training_samples
from models.anomaly_map import anomaly_maps
from models.extractor import FeatureExtractor, build_extractor
from models.flow import grid_coordinates
from models.losses import BoundaryAverager, flow_loss, normal_boundary, occ_loss
from models.residual import ReferenceBank, flatten_positions
from models.resad import ResAD
from utils import io
from utils.errors import UserError
from utils.metrics import METRIC_NAMES, compute_metrics
from utils.seed import rng_state, seed_everything, set_rng_state

CSV_COLUMNS = ("Class Name",) + METRIC_NAMES
FLOW_MINIBATCH = 8192
LR_MILESTONES = (70, 90)
CHECKPOINT_FORMAT = "resad-checkpoint-1"


# --------------------------------------------------------------------------- setup helpers

def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda:N`` is checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def build_model(args: argparse.Namespace, channels: Sequence[int]) -> ResAD:
    return ResAD(channels, num_embeddings=args.num_embeddings, coupling_layers=args.coupling_layers,
                 clamp_alpha=args.clamp_alpha, pos_embed_dim=args.pos_embed_dim, flow_arch=args.flow_arch,
                 residual_mode=args.residual, fdm_alpha=args.fdm_alpha)


def make_loader(samples: Sequence[Sample], extractor: FeatureExtractor, batch_size: int, num_workers: int,
                shuffle: bool = False, drop_last: bool = False, generator: Optional[torch.Generator] = None) -> DataLoader:
    dataset = AnomalyDataset(list(samples), image_size=extractor.image_size, mean=extractor.mean, std=extractor.std)
    # A loader draws its workers' base seed from its generator; giving every loader one keeps
    # the global random state untouched by evaluation, so a resumed run repeats an uninterrupted one.
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


def level_masks(masks: torch.Tensor, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Nearest-neighbour down-sampling of (B, 1, S, S) masks to each level: (B, H_l, W_l)."""
    return [F.interpolate(masks, size=f.shape[-2:], mode="nearest").squeeze(1) for f in features]


def check_at_least(args: argparse.Namespace, minimum: int, *flags: str) -> None:
    """UserError naming the first of ``flags`` whose value is below ``minimum``."""
    for flag in flags:
        if getattr(args, flag) < minimum:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least {minimum}")


# --------------------------------------------------------------------------- training references

class TrainReferencePool:
    """Encoded features of a bounded pool of normal training images per seen class.

    The authors re-read and re-encode k random images per class in every batch;
    here ``pool_size`` images per class are encoded once per epoch (:meth:`refresh`)
    and each batch draws its k references from the pool.
    """

    def __init__(self, extractor: FeatureExtractor, normals: Dict[str, List[Sample]], pool_size: int,
                 batch_size: int, num_workers: int, device: torch.device):
        self.extractor, self.normals, self.pool_size = extractor, normals, pool_size
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.features: Dict[str, List[torch.Tensor]] = {}

    def refresh(self, generator: torch.Generator) -> None:
        chosen, owners = [], []
        for name, samples in self.normals.items():
            order = torch.randperm(len(samples), generator=generator)[: self.pool_size].tolist()
            chosen += [samples[i] for i in sorted(order)]
            owners += [name] * min(self.pool_size, len(samples))
        loader = make_loader(chosen, self.extractor, self.batch_size, self.num_workers)
        encoded = [[] for _ in self.extractor.channels]
        for batch in tqdm(loader, desc="reference pool", leave=False, dynamic_ncols=True):
            for level, f in enumerate(self.extractor(batch["image"].to(self.device))):
                encoded[level].append(f)
        encoded = [torch.cat(level) for level in encoded]
        owners = np.array(owners)
        self.features = {name: [level[torch.from_numpy(np.flatnonzero(owners == name)).to(self.device)]
                                for level in encoded] for name in self.normals}

    def bank(self, class_name: str, shots: int, generator: torch.Generator) -> ReferenceBank:
        levels = self.features[class_name]
        pick = torch.randperm(levels[0].shape[0], generator=generator)[:shots].to(self.device)
        return ReferenceBank.from_features([level[pick] for level in levels])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for levels in self.features.values() for t in levels)


# --------------------------------------------------------------------------- training

@dataclass
class StepGuard:
    """Skips optimizer steps on non-finite losses and stops after too many in a row."""
    max_consecutive: int = 50
    consecutive: int = 0
    skipped: int = 0

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> Optional[float]:
        """Back-propagate and step, unless the loss or a gradient is not finite; returns the loss or None."""
        value = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        if math.isfinite(value) and loss.requires_grad:
            loss.backward()
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if not params or math.isfinite(float(torch.nn.utils.clip_grad_norm_(params, float("inf")))):
                optimizer.step()
                self.consecutive = 0
                return value
            optimizer.zero_grad(set_to_none=True)
        elif math.isfinite(value):  # nothing to learn from (e.g. no normal position for the VQ)
            return value
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive == 1 or self.skipped % 100 == 0:
            warnings.warn(f"non-finite loss or gradient (loss {value}); optimizer step skipped "
                          f"({self.skipped} so far)", RuntimeWarning, stacklevel=2)
        if self.consecutive >= self.max_consecutive:
            raise UserError(f"training diverged: {self.consecutive} consecutive non-finite losses or gradients; "
                            f"lower --lr, or raise --max_bad_steps (now {self.max_consecutive})")
        return None


@dataclass
class Trainer:
    """Optimizers, schedulers and boundary averages of one ResAD model."""
    model: ResAD
    args: argparse.Namespace
    guard: StepGuard = field(default_factory=StepGuard)

    def __post_init__(self):
        a, m = self.args, self.model
        adam = dict(lr=a.lr, weight_decay=5e-4)
        self.optimizers = {"vq": torch.optim.Adam(m.vq.parameters(), **adam),
                           "constraintor": torch.optim.Adam(m.constraintor.parameters(), **adam),
                           "flow": torch.optim.Adam(m.flows.parameters(), **adam)}
        self.schedulers = {k: torch.optim.lr_scheduler.MultiStepLR(o, milestones=list(LR_MILESTONES), gamma=0.1)
                           for k, o in self.optimizers.items()}
        self.boundaries = BoundaryAverager(len(m.channels))
        self.guard.max_consecutive = a.max_bad_steps

    def train_step(self, features: List[torch.Tensor], residuals: List[torch.Tensor], masks: torch.Tensor,
                   stage2: bool, generator: torch.Generator) -> Dict[str, float]:
        """One batch: VQ loss, constraintor OCC loss, then the flows on the detached constrained residuals."""
        m, args = self.model, self.args
        lvl_masks = level_masks(masks, features)
        losses = {}
        losses["vq"] = self.guard.step(m.vq.loss(residuals, lvl_masks), self.optimizers["vq"])
        constrained = m.constraintor(residuals)
        occ = sum(occ_loss(flatten_positions(e), flatten_positions(r), lm.reshape(-1))
                  for e, r, lm in zip(constrained, residuals, lvl_masks))
        losses["occ"] = self.guard.step(occ, self.optimizers["constraintor"])
        flow_values = []
        for level, (e, lm) in enumerate(zip(constrained, lvl_masks)):
            b, _, h, w = e.shape
            rows = flatten_positions(e.detach())
            coords = grid_coordinates(h, w, rows.device).repeat(b, 1)
            mask_rows = lm.reshape(-1)
            # Every position is used: the last mini-batch may be smaller (the
            # authors drop it, which leaves a 14x14 level untrained at batch 32).
            for idx in torch.randperm(rows.shape[0], generator=generator).to(rows.device).split(FLOW_MINIBATCH):
                logp, logp_a = m.flow_log_likelihoods(level, rows[idx], coords[idx])
                mb_mask = mask_rows[idx]
                self.boundaries.update(level, normal_boundary(logp, mb_mask, args.pos_beta))
                bounds = None
                if stage2:
                    b_n = self.boundaries.get(level)
                    bounds = (b_n, b_n - args.margin_tau)
                value = self.guard.step(flow_loss(logp, logp_a, mb_mask, bounds, args.bgspp_lambda),
                                        self.optimizers["flow"])
                if value is not None:
                    flow_values.append(value)
        losses["flow"] = float(np.mean(flow_values)) if flow_values else None
        return losses

    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "boundaries": self.boundaries.state_dict(),
                "skipped_steps": self.guard.skipped}

    def load_state_dict(self, state: dict) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.boundaries.load_state_dict(state["boundaries"])
        self.guard.skipped = state.get("skipped_steps", 0)


def batch_residuals(model: ResAD, features: List[torch.Tensor], class_names: Sequence[str],
                    bank_of) -> List[torch.Tensor]:
    """Residuals of a mixed-class batch: each image against the bank of its own class."""
    names = np.array(class_names)
    out = [torch.empty_like(f) for f in features]
    for name in np.unique(names):
        idx = torch.from_numpy(np.flatnonzero(names == name)).to(features[0].device)
        for level, r in enumerate(model.residuals([f[idx] for f in features], bank_of(name))):
            out[level][idx] = r
    return out


def train_one_epoch(trainer: Trainer, extractor: FeatureExtractor, loader: DataLoader, pool: TrainReferencePool,
                    stage2: bool, generator: torch.Generator, device: torch.device, desc: str) -> Dict[str, float]:
    model, shots = trainer.model, trainer.args.train_ref_shot
    model.train()
    totals: Dict[str, List[float]] = {"vq": [], "occ": [], "flow": []}
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        features = extractor(images)
        residuals = batch_residuals(model, features, batch["class_name"],
                                    lambda name: pool.bank(name, shots, generator))
        for key, value in trainer.train_step(features, residuals, masks, stage2, generator).items():
            if value is not None:
                totals[key].append(value)
        bar.set_postfix({k: f"{np.mean(v):.3f}" for k, v in totals.items() if v})
    return {k: float(np.mean(v)) if v else float("nan") for k, v in totals.items()}


# --------------------------------------------------------------------------- evaluation

@dataclass
class ClassEvaluation:
    metrics: Dict[str, float]
    heatmaps: List[dict]   # a few samples: image (S,S,3) in [0,1], mask, map, label, path, value_range


@torch.no_grad()
def evaluate(model: ResAD, extractor: FeatureExtractor, test_sets: Dict[str, List[Sample]],
             banks: Dict[str, ReferenceBank], shots: Sequence[int], args: argparse.Namespace,
             device: torch.device, num_heatmaps: int = 0) -> Dict[int, Dict[str, ClassEvaluation]]:
    """Evaluate every unseen class for every number of shots (features are extracted once per batch)."""
    model.eval()
    results: Dict[int, Dict[str, ClassEvaluation]] = {k: {} for k in shots}
    for class_name, samples in test_sets.items():
        loader = make_loader(samples, extractor, args.eval_batch_size, args.num_workers)
        keep = _heatmap_indices(samples, num_heatmaps)
        per_shot = {k: ([[] for _ in model.channels], [[] for _ in model.channels]) for k in shots}
        labels, masks, kept = [], [], {}
        bank_views = {k: banks[class_name].take(k) for k in shots}
        offset = 0
        for batch in tqdm(loader, desc=f"eval {class_name}", leave=False, dynamic_ncols=True):
            images = batch["image"]
            features = extractor(images.to(device, non_blocking=True))
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
            results[k][class_name] = ClassEvaluation(metrics, heat)
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
    rows = [{"Class Name": name, **ev.metrics} for name, ev in per_class.items()]
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    mean = frame[list(METRIC_NAMES)].mean(axis=0, skipna=True)
    return pd.concat([frame, pd.DataFrame([{"Class Name": "Mean", **mean.to_dict()}])], ignore_index=True)


def summary_line(tag: str, table: pd.DataFrame) -> str:
    mean = table.iloc[-1]
    return (f"{tag}: image AUROC {mean['Image AUC']:.4f} | pixel AUROC {mean['Pixel AUC']:.4f} | "
            f"AUPRO {mean['Pixel AUPRO']:.4f} (mean over {len(table) - 1} classes)")


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
    for key in ("coupling_layers", "flow_arch", "pos_embed_dim", "num_embeddings", "residual"):
        if key in saved and saved[key] != getattr(args, key):
            raise UserError(f"--resume {path}: the checkpoint has --{key} {saved[key]}, this run "
                            f"{getattr(args, key)}; use the same model options")


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


def fit(args: argparse.Namespace, shots: Sequence[int], run_names: Dict[int, str],
        extractor: Optional[FeatureExtractor] = None) -> Dict[int, pd.DataFrame]:
    """Train on the seen classes of ``args.setting`` and evaluate the unseen ones for each number of shots.

    ``extractor`` may be passed when the caller already built it from ``args``.
    Returns the last evaluation's table per number of shots.
    """
    device = resolve_device(args.device)
    seed_everything(args.seed)
    setting = get_setting(args.setting)
    outputs = {k: RunOutputs(io.check_writable(os.path.join(args.checkpoint_path, run_names[k])), run_names[k])
               for k in shots}

    # Check every input before spending time on training.
    test_sets = {c: test_samples(setting.target, args.test_dataset_dir, c) for c in setting.unseen_classes}
    stage_samples = {stage: training_samples(setting.source, args.train_dataset_dir, setting.seen_classes, stage=stage)
                     for stage in (1, 2)}
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

    if extractor is None:
        extractor = build_extractor(args.backbone, args.backbone_weights, device=device)
    banks = io.load_reference_banks(args.test_ref_feature_dir, setting.unseen_classes, extractor.describe(), max(shots), device)
    model = build_model(args, extractor.channels).to(device)
    trainer = Trainer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, best, last_tables = 0, {}, {}

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
    loaders = {stage: make_loader(stage_samples[stage], extractor, args.batch_size, args.num_workers,
                                  shuffle=True, drop_last=True, generator=generator) for stage in (1, 2)}
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
                           num_heatmaps=args.num_heatmaps if final else 0)
        improved = []
        for k in shots:
            last_tables[k] = write_evaluation(outputs[k], done, results[k], heatmaps=final)
            print(summary_line(f"{outputs[k].name} epoch {done}", last_tables[k]))
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
            "channels": extractor.channels, "epoch": epoch, "model": model.state_dict(),
            "trainer": trainer.state_dict(), "generator": generator.get_state(), "rng": rng_state(),
            "best": dict(best)}


# --------------------------------------------------------------------------- reference features

@torch.no_grad()
def extract_reference_features(dataset: str, few_shot_dir: str, save_dir: str, extractor: FeatureExtractor,
                               shots: Optional[int] = None, classes: Optional[Sequence[str]] = None,
                               batch_size: int = 8, num_workers: int = 0) -> Dict[str, str]:
    """Encode the few-shot reference images of every class of ``dataset`` and save them.

    Writes ``<save_dir>/<class>/layer{1,2,3}.npy`` (float32, (k*H*W, C),
    image-major) plus ``meta.json`` naming the backbone and the image files.
    """
    from datasets import get_dataset, list_fewshot_images

    if shots is not None and shots < 1:
        raise UserError(f"--shots {shots}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    info = get_dataset(dataset)
    names = list(classes) if classes else list(info.classes)
    unknown = [c for c in names if c not in info.classes]
    if unknown:
        raise UserError(f"--classes: {', '.join(unknown)} not in {dataset} (classes: {', '.join(info.classes)})")
    files = {c: list_fewshot_images(few_shot_dir, c, max_shots=shots) for c in names}  # check all first
    io.ensure_dir(save_dir, "--save_dir")
    written = {}
    device = next(extractor.parameters()).device
    for class_name in tqdm(names, desc=f"reference features ({dataset})", dynamic_ncols=True):
        samples = [Sample(path, 0, (), class_name) for path in files[class_name]]
        levels = [[] for _ in extractor.channels]
        for batch in make_loader(samples, extractor, batch_size, num_workers):
            for level, f in enumerate(extractor(batch["image"].to(device))):
                levels[level].append(f.cpu())
        meta = dict(extractor.describe(), dataset=dataset, images=[os.path.abspath(p) for p in files[class_name]])
        written[class_name] = io.save_reference_features(save_dir, class_name, [torch.cat(l) for l in levels], meta)
    return written
