"""Training: the reference pool of the seen classes, the per-batch step and one epoch.

:class:`Trainer` holds the three optimizers (VQ, constraintor, flows), their
schedulers and the BG-SPP boundary averages; :func:`train_one_epoch` runs it
over a loader.  The whole run (epochs, evaluation, files) is :func:`utils.engine.fit`.
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import Sample
from models.extractor import FeatureExtractor
from models.flow import grid_coordinates
from models.losses import BoundaryAverager, flow_loss, normal_boundary, occ_loss
from models.residual import ReferenceBank, flatten_positions
from models.resad import ResAD
from utils.errors import UserError
from utils.loaders import make_loader

FLOW_MINIBATCH = 8192
LR_MILESTONES = (70, 90)


def level_masks(masks: torch.Tensor, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Nearest-neighbour down-sampling of (B, 1, S, S) masks to each level: (B, H_l, W_l)."""
    return [F.interpolate(masks, size=f.shape[-2:], mode="nearest").squeeze(1) for f in features]



# --------------------------------------------------------------------------- training references

class TrainReferencePool:
    """Encoded features of a bounded pool of normal training images per seen class.

    The authors re-read and re-encode k random images per class in every batch;
    here ``pool_size`` images per class are drawn once per epoch (:meth:`refresh`)
    and each batch draws its k references from the pool.  The extractor is frozen,
    so an image's features never change: a refresh encodes only the images that
    were not in the previous pool, and a training batch whose images are all in
    the pool takes their features from it (:meth:`lookup`) instead of running the
    backbone again.  Memory stays that of one pool.
    """

    def __init__(self, extractor: FeatureExtractor, normals: Dict[str, List[Sample]], pool_size: int,
                 batch_size: int, num_workers: int, device: torch.device):
        self.extractor, self.normals, self.pool_size = extractor, normals, pool_size
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.features: Dict[str, List[torch.Tensor]] = {}
        self._where: Dict[str, tuple] = {}  # image path -> (class, row in that class's pool tensors)
        self.encoded_last_refresh = 0

    def refresh(self, generator: torch.Generator) -> None:
        chosen: Dict[str, List[Sample]] = {}
        for name, samples in self.normals.items():
            order = torch.randperm(len(samples), generator=generator)[: self.pool_size].tolist()
            chosen[name] = [samples[i] for i in sorted(order)]
        missing = list(dict.fromkeys(s.image for picks in chosen.values() for s in picks if s.image not in self._where))
        by_path = {s.image: s for picks in chosen.values() for s in picks}
        fresh: Dict[str, List[torch.Tensor]] = {}
        if missing:
            loader = make_loader([by_path[p] for p in missing], self.extractor, self.batch_size, self.num_workers)
            encoded = [[] for _ in self.extractor.channels]
            for batch in tqdm(loader, desc="reference pool", leave=False, dynamic_ncols=True):
                for level, f in enumerate(self.extractor(batch["image"].to(self.device))):
                    encoded[level].append(f)
            encoded = [torch.cat(level) for level in encoded]
            fresh = {path: [level[i] for level in encoded] for i, path in enumerate(missing)}

        def image_features(path: str) -> List[torch.Tensor]:
            if path in fresh:
                return fresh[path]
            name, row = self._where[path]
            return [level[row] for level in self.features[name]]

        features = {name: [torch.stack(level) for level in zip(*(image_features(s.image) for s in picks))]
                    for name, picks in chosen.items()}
        self.features = features
        self._where = {s.image: (name, row) for name, picks in chosen.items() for row, s in enumerate(picks)}
        self.encoded_last_refresh = len(missing)

    def lookup(self, paths: Sequence[str]) -> Optional[List[torch.Tensor]]:
        """Per-level features of these images from the pool, or None unless all of them are in it."""
        if not self._where or any(p not in self._where for p in paths):
            return None
        places = [self._where[p] for p in paths]
        return [torch.stack([self.features[name][level][row] for name, row in places])
                for level in range(len(self.extractor.channels))]

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
        masks = batch["mask"].to(device, non_blocking=True)
        features = pool.lookup(batch["path"])
        if features is None:
            features = extractor(batch["image"].to(device, non_blocking=True))
        residuals = batch_residuals(model, features, batch["class_name"],
                                    lambda name: pool.bank(name, shots, generator))
        for key, value in trainer.train_step(features, residuals, masks, stage2, generator).items():
            if value is not None:
                totals[key].append(value)
        bar.set_postfix({k: f"{np.mean(v):.3f}" for k, v in totals.items() if v})
    return {k: float(np.mean(v)) if v else float("nan") for k, v in totals.items()}
