"""The ResAD model: tensors in, log-likelihood maps out (no loops over data, no files).

Components per feature level (docs/method.md §2): a VQ codebook (distribution
matching at inference), the feature constraintor and a conditional normalizing
flow.  The frozen feature extractor and the reference banks live outside the
model; the training harness is :mod:`utils.run.training`.  The options that
shape the model are a :class:`ModelConfig`, stored in every checkpoint.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.constraintor import FeatureConstraintor
from models.flow import FLOW_ARCHS, LevelFlow, grid_coordinates, log_likelihoods
from models.knn_baseline import knn_level_maps
from models.matching import DEFAULT_MATCHER, Matcher, ReferenceBank
from models.positions import flatten_positions
from models.residual import RESIDUAL_MODES, match_feature_distribution, residual_distance, residual_features
from models.vq import MultiScaleVQ
from utils.stages import stage

# Positions sent through a flow at once at inference: large on a GPU, cache-sized
# on a CPU (where 4096 was 2x faster than 25088; docs/performance.md).
INFERENCE_CHUNK = {"cuda": 65536, "cpu": 4096}


class LevelScores(NamedTuple):
    """What ResAD returns for a batch, per level (B, H, W) maps: the flow's log-likelihood logp, the
    abnormal probability softmax([logp, logp_a])[1], the norm |e| of the constrained residual and the
    distance |f - r| of each feature to its matched reference (before distribution matching); and, when
    asked for (:meth:`ResAD.forward_shots` with ``nearest_levels``), the Euclidean distance of each feature
    to its nearest reference feature, the kNN baseline's score (docs/method.md §6), None at the levels not
    searched; else empty."""
    logps: List[torch.Tensor]
    abnormal_probs: List[torch.Tensor]
    norms: List[torch.Tensor]
    distances: List[torch.Tensor]
    nearest: Sequence[torch.Tensor] = ()   # immutable default: one shared by every instance


@dataclass(frozen=True)
class ModelConfig:
    """The options that shape a trained ResAD (the authors' defaults); a checkpoint stores them."""
    num_embeddings: int = 1536          # VQ codebook entries per level
    coupling_layers: int = 10           # FrEIA AllInOneBlocks per flow
    clamp_alpha: float = 1.9            # affine clamping of the coupling blocks
    pos_embed_dim: int = 256            # positional encoding of the conditional flows
    flow_arch: str = "conditional_flow_model"
    residual: str = "squared"           # squared (authors' code) or difference (paper)

    def __post_init__(self):
        if self.flow_arch not in FLOW_ARCHS:
            raise ValueError(f"unknown flow architecture {self.flow_arch!r}; choose from {FLOW_ARCHS}")
        if self.residual not in RESIDUAL_MODES:
            raise ValueError(f"unknown residual mode {self.residual!r}; choose from {RESIDUAL_MODES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """The fields of ``values`` that are model options (others are ignored; missing ones take the defaults)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def differences(self, other: "ModelConfig") -> Dict[str, tuple]:
        """{option: (self's value, other's value)} of every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}


class ResAD(nn.Module):
    """``fdm_alpha``: the EFDM strength at inference (1 = no matching).  ``matcher`` and
    ``inference_chunk`` (positions per flow call, per device kind) tune the speed only."""

    def __init__(self, channels: Sequence[int], config: ModelConfig = ModelConfig(), fdm_alpha: float = 0.4,
                 matcher: Optional[Matcher] = None, inference_chunk: Optional[Dict[str, int]] = None):
        super().__init__()
        self.channels = list(channels)
        self.config = config
        self.fdm_alpha = fdm_alpha
        self.matcher = matcher or DEFAULT_MATCHER
        self.inference_chunk = {**INFERENCE_CHUNK, **(inference_chunk or {})}
        self.vq = MultiScaleVQ(channels, config.num_embeddings)
        self.constraintor = FeatureConstraintor(channels)
        self.flows = nn.ModuleList([LevelFlow(c, config.coupling_layers, config.clamp_alpha, config.pos_embed_dim,
                                              config.flow_arch) for c in channels])

    def residuals(self, features: Sequence[torch.Tensor], bank: ReferenceBank) -> List[torch.Tensor]:
        """Residual features of a batch of images of one class against its reference bank."""
        with stage("matching"):
            matched = self.matcher.match(features, bank)
        return residual_features(features, matched, self.config.residual)

    def flow_log_likelihoods(self, level: int, rows: torch.Tensor, coords: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logp, logp_a) per row of constrained residuals (N, C) at positions (N, 2)."""
        z, log_det = self.flows[level](rows, coords)
        return log_likelihoods(z, log_det)

    @torch.no_grad()
    def forward(self, features: Sequence[torch.Tensor], bank: ReferenceBank) -> LevelScores:
        """Score a batch of images of one class: per level, logp, the abnormal probability and |e|."""
        return self.score_residuals(self.residuals(features, bank))

    @torch.no_grad()
    def forward_shots(self, features: Sequence[torch.Tensor], bank: ReferenceBank, shots: Sequence[int],
                      nearest_levels: Optional[Sequence[int]] = None) -> Dict[int, LevelScores]:
        """:meth:`forward` for each k in ``shots`` (the bank cut to its first k shots) from one matching.
        ``nearest_levels``: also the distances to the nearest reference at these levels
        (:attr:`LevelScores.nearest`, None at the others), from one more search of the same bank."""
        with stage("matching"):
            matched = self.matcher.match_by_shots(features, bank, shots)
        scores = {k: self.score_residuals(residual_features(features, matched[k], self.config.residual))
                  for k in shots}
        if nearest_levels is not None:
            with stage("kNN search"):
                found = knn_level_maps(features, bank, shots, self.matcher, levels=nearest_levels)
            scores = {k: found_k._replace(nearest=found[k]) for k, found_k in scores.items()}
        return scores

    def distribution_match(self, residuals: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """EFDM of each residual map toward its VQ-quantised version (docs/method.md §2.5)."""
        quantized = self.vq.quantize(residuals)
        return [match_feature_distribution(r, q, self.fdm_alpha) for r, q in zip(residuals, quantized)]

    @torch.no_grad()
    def score_residuals(self, residuals: Sequence[torch.Tensor]) -> LevelScores:
        """Distribution matching, constraintor and flows: the per-level maps of :class:`LevelScores`."""
        distances = [residual_distance(r, self.config.residual) for r in residuals]
        with stage("VQ + EFDM"):
            residuals = self.distribution_match(residuals)
        with stage("constraintor"):
            constrained = self.constraintor(residuals)
        logps, abnormal_probs, norms = [], [], []
        for level, e in enumerate(constrained):
            with stage(f"flow L{level + 1}"):
                logp, logp_a = self._flow_in_chunks(level, e)
            b, _, h, w = e.shape
            logps.append(logp.reshape(b, h, w))
            abnormal_probs.append(torch.softmax(torch.stack([logp, logp_a], dim=-1), dim=-1)[:, 1].reshape(b, h, w))
            norms.append(e.norm(dim=1))
        return LevelScores(logps, abnormal_probs, norms, distances)

    def _flow_in_chunks(self, level: int, constrained: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = constrained.shape
        rows = flatten_positions(constrained)
        coords = grid_coordinates(h, w, constrained.device).repeat(b, 1)
        chunk = self.inference_chunk["cuda" if constrained.device.type == "cuda" else "cpu"]
        outputs = [self.flow_log_likelihoods(level, r, c) for r, c in zip(rows.split(chunk), coords.split(chunk))]
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
