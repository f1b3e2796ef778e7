"""The previous implementations, kept to measure before/after in one run and to check
that the fast paths compute the same numbers (benchmarks/train_speed.py --compare,
benchmarks/eval_speed.py --compare, tests/test_speed.py).

Not used by the project's code.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import numpy as np
import torch
from tqdm import tqdm

import models.residual as residual

from models.flow import grid_coordinates
from models.losses import flow_loss, normal_boundary, occ_loss
from models.residual import flatten_positions
from utils.loaders import make_loader
from utils.training import FLOW_MINIBATCH, Trainer, TrainReferencePool, level_masks


LEGACY_BLOCK_ELEMENTS = {"cuda": 2 ** 26, "cpu": 2 ** 20}


@contextlib.contextmanager
def legacy_matching():
    """Within: the matcher and the VQ use the previous block sizes and float32 products only."""
    saved = dict(residual._MAX_BLOCK_ELEMENTS), dict(residual.APPROXIMATE_SIMILARITY_DTYPE)
    residual._MAX_BLOCK_ELEMENTS.update(LEGACY_BLOCK_ELEMENTS)
    residual.APPROXIMATE_SIMILARITY_DTYPE.update({"cuda": None, "cpu": None})
    try:
        yield
    finally:
        residual._MAX_BLOCK_ELEMENTS.update(saved[0])
        residual.APPROXIMATE_SIMILARITY_DTYPE.update(saved[1])


class LegacyReferencePool(TrainReferencePool):
    """The previous pool: every refresh re-encodes the whole pool; batches run the backbone."""

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

    def lookup(self, paths):
        return None


class LegacyTrainer(Trainer):
    """Trainer with the previous training step."""

    def train_step(self, features: List[torch.Tensor], residuals: List[torch.Tensor], masks: torch.Tensor,
                   stage2: bool, generator: torch.Generator) -> Dict[str, float]:
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
