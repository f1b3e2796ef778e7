"""Training: the per-batch step and one epoch (docs/method.md §3, §4).

:class:`Trainer` holds the three optimizers (VQ, constraintor, flows), their
schedulers and the BG-SPP boundary averages; :func:`train_one_epoch` runs it
over a loader.  The whole run (epochs, evaluation, files) is
:class:`utils.run.train_run.TrainingRun`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.extractor import FeatureExtractor
from models.flow import grid_coordinates
from models.losses import BoundaryAverager, flow_loss, normal_boundary, occ_loss
from models.positions import flatten_positions
from models.resad import ResAD
from utils import distributed
from utils.errors import UserError
from utils.run.config import TrainConfig
from utils.run.reference_pool import TrainReferencePool
from utils.stages import stage, staged

FLOW_MINIBATCH = 8192
LR_MILESTONES = (70, 90)


def level_masks(masks: torch.Tensor, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Nearest-neighbour down-sampling of (B, 1, S, S) masks to each level: (B, H_l, W_l)."""
    return [F.interpolate(masks, size=f.shape[-2:], mode="nearest").squeeze(1) for f in features]



# --------------------------------------------------------------------------- training

@dataclass
class StepGuard:
    """Skips optimizer steps on non-finite losses and stops after too many in a row."""
    max_consecutive: int = 50
    consecutive: int = 0
    skipped: int = 0

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> Optional[float]:
        """Back-propagate and step, unless the loss or a gradient is not finite; returns the loss or None.
        Under torchrun the ranks decide together (:meth:`_step_together`)."""
        value = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        if distributed.current().active:
            return self._step_together(value, loss, optimizer)
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
        return self._skipped(value)

    def _step_together(self, value: float, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> Optional[float]:
        """All ranks step or skip together: a step when every rank's loss and gradients are finite and at
        least one rank has a graph, with the gradients averaged over the ranks (a rank without a graph
        contributes zeros; a parameter no rank has a gradient for is left alone, as in one process)."""
        graph = math.isfinite(value) and loss.requires_grad
        if graph:
            loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = math.isfinite(value) and all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        flags = torch.tensor([0.0 if finite else 1.0, 1.0 if graph else 0.0]
                             + [0.0 if p.grad is None else 1.0 for p in params])
        flags = distributed.all_reduce(flags, "max").tolist()
        if flags[0] == 0 and flags[1] == 1:
            distributed.average_gradients([p for p, has in zip(params, flags[2:]) if has])
            optimizer.step()
            self.consecutive = 0
            return value
        optimizer.zero_grad(set_to_none=True)
        if flags[0] == 0:  # no rank has anything to learn from
            return value
        return self._skipped(value)

    def _skipped(self, value: float) -> None:
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive == 1 or self.skipped % 100 == 0:
            warnings.warn(f"non-finite loss or gradient (loss {value}); optimizer step skipped "
                          f"({self.skipped} so far)", RuntimeWarning, stacklevel=3)
        if self.consecutive >= self.max_consecutive:
            raise UserError(f"training diverged: {self.consecutive} consecutive non-finite losses or gradients; "
                            f"lower --lr, or raise --max_bad_steps (now {self.max_consecutive})")
        return None


@dataclass
class Trainer:
    """Optimizers, schedulers and boundary averages of one ResAD model."""
    model: ResAD
    config: TrainConfig
    guard: StepGuard = field(default_factory=StepGuard)

    def __post_init__(self):
        m = self.model
        adam = dict(lr=self.config.lr, weight_decay=5e-4)
        self.optimizers = {"vq": torch.optim.Adam(m.vq.parameters(), **adam),
                           "constraintor": torch.optim.Adam(m.constraintor.parameters(), **adam),
                           "flow": torch.optim.Adam(m.flows.parameters(), **adam)}
        self.schedulers = {k: torch.optim.lr_scheduler.MultiStepLR(o, milestones=list(LR_MILESTONES), gamma=0.1)
                           for k, o in self.optimizers.items()}
        self.boundaries = BoundaryAverager(len(m.channels))
        self.guard.max_consecutive = self.config.max_bad_steps

    def _step(self, name: str, loss: torch.Tensor, optimizer: str) -> Optional[float]:
        with stage(name):
            return self.guard.step(loss, self.optimizers[optimizer])

    def train_step(self, features: List[torch.Tensor], residuals: List[torch.Tensor], masks: torch.Tensor,
                   stage2: bool, generator: torch.Generator) -> Dict[str, float]:
        """One batch: VQ loss, constraintor OCC loss, then the flows on the detached constrained residuals."""
        m = self.model
        lvl_masks = level_masks(masks, features)
        losses = {}
        with stage("VQ loss"):
            vq = m.vq.loss(residuals, lvl_masks)
        losses["vq"] = self._step("vq backward + Adam", vq, "vq")
        with stage("constraintor forward"):
            constrained = m.constraintor(residuals)
        with stage("OCC loss"):
            occ = sum(occ_loss(flatten_positions(e), flatten_positions(r), lm.reshape(-1))
                      for e, r, lm in zip(constrained, residuals, lvl_masks))
        losses["occ"] = self._step("constraintor backward + Adam", occ, "constraintor")
        distributed.average_buffers(m.constraintor)   # BatchNorm's running statistics, the same on every rank
        flow_values = []
        for level, (e, lm) in enumerate(zip(constrained, lvl_masks)):
            flow_values += self._flow_level(level, e, lm, stage2, generator)
        losses["flow"] = float(np.mean(flow_values)) if flow_values else None
        return losses

    def _flow_level(self, level: int, constrained: torch.Tensor, mask: torch.Tensor, stage2: bool,
                    generator: torch.Generator) -> List[float]:
        """The flow steps of one level over random mini-batches of its positions; their loss values."""
        b, _, h, w = constrained.shape
        rows = flatten_positions(constrained.detach())
        coords = grid_coordinates(h, w, rows.device).repeat(b, 1)
        mask_rows = mask.reshape(-1)
        cfg, values = self.config, []
        # Every position is used: the last mini-batch may be smaller (the authors drop it, which
        # leaves a 14x14 level untrained at batch 32; docs/method.md §3.4).
        for idx in torch.randperm(rows.shape[0], generator=generator).to(rows.device).split(FLOW_MINIBATCH):
            with stage(f"flow L{level + 1} forward"):
                logp, logp_a = self.model.flow_log_likelihoods(level, rows[idx], coords[idx])
            with stage("flow losses"):
                mb_mask = mask_rows[idx]
                self.boundaries.update(level, distributed.mean_over_ranks(normal_boundary(logp, mb_mask, cfg.pos_beta)))
                bounds = None
                if stage2:
                    b_n = self.boundaries.get(level)
                    bounds = (b_n, b_n - cfg.margin_tau)
                loss = flow_loss(logp, logp_a, mb_mask, bounds, cfg.bgspp_lambda)
            value = self._step(f"flow L{level + 1} backward + Adam", loss, "flow")
            if value is not None:
                values.append(value)
        return values

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
                    banks_of) -> List[torch.Tensor]:
    """Residuals of a mixed-class batch: each image against references of its own class.

    ``banks_of(name, positions)`` gives the references of the batch's images of class ``name`` at
    ``positions``: a list of (positions, bank) pairs, the images at those positions sharing that bank.
    """
    names = np.array(class_names)
    out = [torch.empty_like(f) for f in features]
    for name in np.unique(names):
        for rows, bank in banks_of(name, np.flatnonzero(names == name)):
            idx = torch.from_numpy(rows).to(features[0].device)
            for level, r in enumerate(model.residuals([f[idx] for f in features], bank)):
                out[level][idx] = r
    return out


def reference_draw(pool: TrainReferencePool, paths: Sequence[str], shots: int, exclude_self: bool,
                   generator: torch.Generator):
    """The ``banks_of`` of :func:`batch_residuals` for one batch: :meth:`TrainReferencePool.banks`."""
    def banks_of(name: str, rows: np.ndarray):
        return [(rows[local], bank) for local, bank in
                pool.banks(name, [paths[i] for i in rows], shots, generator, exclude_self)]
    return banks_of


def train_one_epoch(trainer: Trainer, extractor: FeatureExtractor, loader: DataLoader, pool: TrainReferencePool,
                    stage2: bool, generator: torch.Generator, device: torch.device, desc: str) -> Dict[str, float]:
    model, shots = trainer.model, trainer.config.train_ref_shot
    model.train()
    totals: Dict[str, List[float]] = {"vq": [], "occ": [], "flow": []}
    bar = tqdm(staged(loader, "loading"), total=len(loader), desc=desc, leave=False, dynamic_ncols=True)
    for batch in bar:
        masks = batch["mask"].to(device, non_blocking=True)
        features = pool.lookup(batch["path"], batch["label"])
        if features is None:
            features = extractor(batch["image"].to(device, non_blocking=True))
        residuals = batch_residuals(model, features, batch["class_name"],
                                    reference_draw(pool, batch["path"], shots, trainer.config.train_exclude_self,
                                                   generator))
        for key, value in trainer.train_step(features, residuals, masks, stage2, generator).items():
            if value is not None:
                totals[key].append(value)
        bar.set_postfix({k: f"{np.mean(v):.3f}" for k, v in totals.items() if v})
    return {k: float(np.mean(v)) if v else float("nan") for k, v in totals.items()}
