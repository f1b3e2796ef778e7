"""The ResAD model: tensors in, log-likelihood maps out (no loops over data, no files).

Components per feature level: a VQ codebook (distribution matching at
inference), the feature constraintor and a conditional normalizing flow.  The
frozen feature extractor and the reference banks live outside the model; the
training harness is :mod:`utils.engine`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from models.constraintor import FeatureConstraintor
from models.flow import LevelFlow, grid_coordinates, log_likelihoods
from models.residual import (ReferenceBank, flatten_positions, match_feature_distribution, match_references,
                             match_references_by_shots, residual_features)
from models.vq import MultiScaleVQ

# Positions sent through a flow at once at inference: large on a GPU, cache-sized
# on a CPU (where 4096 was 2x faster than 25088 in benchmarks/eval_speed.py).
INFERENCE_CHUNK = {"cuda": 65536, "cpu": 4096}


class ResAD(nn.Module):
    def __init__(self, channels: Sequence[int], num_embeddings: int = 1536, coupling_layers: int = 10,
                 clamp_alpha: float = 1.9, pos_embed_dim: int = 256, flow_arch: str = "conditional_flow_model",
                 residual_mode: str = "squared", fdm_alpha: float = 0.4):
        super().__init__()
        self.channels = list(channels)
        self.residual_mode = residual_mode
        self.fdm_alpha = fdm_alpha
        self.vq = MultiScaleVQ(channels, num_embeddings)
        self.constraintor = FeatureConstraintor(channels)
        self.flows = nn.ModuleList([LevelFlow(c, coupling_layers, clamp_alpha, pos_embed_dim, flow_arch)
                                    for c in channels])

    def residuals(self, features: Sequence[torch.Tensor], bank: ReferenceBank) -> List[torch.Tensor]:
        """Residual features of a batch of images of one class against its reference bank."""
        return residual_features(features, match_references(features, bank), self.residual_mode)

    def flow_log_likelihoods(self, level: int, rows: torch.Tensor, coords: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logp, logp_a) per row of constrained residuals (N, C) at positions (N, 2)."""
        z, log_det = self.flows[level](rows, coords)
        return log_likelihoods(z, log_det)

    @torch.no_grad()
    def forward(self, features: Sequence[torch.Tensor], bank: ReferenceBank) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Score a batch of images of one class.

        Returns, per level, the log-likelihood map logp (B, H, W) and the
        abnormal probability softmax([logp, logp_a])[1] (B, H, W).
        """
        return self.score_residuals(self.residuals(features, bank))

    @torch.no_grad()
    def forward_shots(self, features: Sequence[torch.Tensor], bank: ReferenceBank,
                      shots: Sequence[int]) -> Dict[int, Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """:meth:`forward` for each k in ``shots`` (the bank cut to its first k shots) from one matching."""
        matched = match_references_by_shots(features, bank, shots)
        return {k: self.score_residuals(residual_features(features, matched[k], self.residual_mode))
                for k in shots}

    @torch.no_grad()
    def score_residuals(self, residuals: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Distribution matching, constraintor and flows: per-level logp and abnormal-probability maps."""
        quantized = self.vq.quantize(residuals)
        residuals = [match_feature_distribution(r, q, self.fdm_alpha) for r, q in zip(residuals, quantized)]
        constrained = self.constraintor(residuals)
        logps, abnormal_probs = [], []
        for level, e in enumerate(constrained):
            b, _, h, w = e.shape
            rows = flatten_positions(e)
            coords = grid_coordinates(h, w, e.device).repeat(b, 1)
            chunk = INFERENCE_CHUNK["cuda" if e.device.type == "cuda" else "cpu"]
            outputs = [self.flow_log_likelihoods(level, r, c) for r, c in zip(rows.split(chunk), coords.split(chunk))]
            logp = torch.cat([o[0] for o in outputs])
            logp_a = torch.cat([o[1] for o in outputs])
            logps.append(logp.reshape(b, h, w))
            abnormal_probs.append(torch.softmax(torch.stack([logp, logp_a], dim=-1), dim=-1)[:, 1].reshape(b, h, w))
        return logps, abnormal_probs
