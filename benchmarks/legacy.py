"""The previous implementations, kept to measure before/after in one run and to check
that the fast paths compute the same numbers (benchmarks/train_speed.py --compare,
benchmarks/eval_speed.py --compare, tests/test_speed.py).

Not used by the project's code.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from models.flow import grid_coordinates
from models.losses import flow_loss, normal_boundary, occ_loss
from models.residual import flatten_positions
from utils.training import FLOW_MINIBATCH, Trainer, level_masks


def legacy_nearest_reference_indices(queries: torch.Tensor, bank_normalized: torch.Tensor) -> torch.Tensor:
    """Before: normalise, one matrix product and arg-max per block of queries."""
    from models.residual import block_rows
    import torch.nn.functional as F

    queries = F.normalize(queries, dim=1)
    block = block_rows(queries.device, bank_normalized.shape[0])
    bank_t = bank_normalized.t()
    return torch.cat([torch.mm(chunk, bank_t).argmax(dim=1) for chunk in queries.split(block)])


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
