"""The previous implementations, kept to measure before/after in one run and to check
that the fast paths compute the same numbers (benchmarks/train_speed.py --compare,
benchmarks/eval_speed.py --compare, tests/test_speed.py).

Each is an instance of a subclass of the production class, not a patched global:
:func:`legacy_copy` gives a copy of a model (same parameters) whose matcher, VQ
search, EFDM and flow position tables run the code before the speed work, and
:class:`LegacyReferencePool` is the pool that re-encoded everything every epoch.
Not used by the project's code.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.flow import PositionConditionedSubnet
from models.matching import Matcher, block_rows
from models.resad import ResAD
from models.vq import VectorQuantizer
from utils.run.loaders import make_loader
from utils.run.reference_pool import TrainReferencePool

LEGACY_BLOCK_ELEMENTS = {"cuda": 2 ** 26, "cpu": 2 ** 20}


class LegacyMatcher(Matcher):
    """The previous matcher: 1M-element fresh similarity blocks, float32 products only, ``argmax`` over them."""

    def __init__(self):
        super().__init__(blocks=LEGACY_BLOCK_ELEMENTS, approximate={"cuda": None, "cpu": None})

    def nearest(self, queries: torch.Tensor, bank_normalized: torch.Tensor) -> torch.Tensor:
        queries = F.normalize(queries, dim=1)
        block = block_rows(queries.device, bank_normalized.shape[0], self.blocks)
        bank_t = bank_normalized.t()
        return torch.cat([torch.mm(chunk, bank_t).argmax(dim=1) for chunk in queries.split(block)])

    def nearest_by_shots(self, queries: torch.Tensor, bank_normalized: torch.Tensor, num_shots: int,
                         shots) -> Dict[int, torch.Tensor]:
        """Fresh blocks, an index-tracking maximum per shot, merged in order."""
        wanted = sorted(set(int(k) for k in shots))
        rows_per_shot = bank_normalized.shape[0] // num_shots
        last = wanted[-1]
        bank_t = bank_normalized[: last * rows_per_shot].t()
        queries = F.normalize(queries, dim=1)
        found: Dict[int, List[torch.Tensor]] = {k: [] for k in wanted}
        for chunk in queries.split(block_rows(queries.device, last * rows_per_shot, self.blocks)):
            similarity = torch.mm(chunk, bank_t)
            best_value = best_index = None
            for shot in range(last):
                value, index = similarity[:, shot * rows_per_shot:(shot + 1) * rows_per_shot].max(dim=1)
                index = index + shot * rows_per_shot
                if best_value is None:
                    best_value, best_index = value, index
                else:
                    better = value > best_value
                    best_value = torch.where(better, value, best_value)
                    best_index = torch.where(better, index, best_index)
                if shot + 1 in found:
                    found[shot + 1].append(best_index)
        return {k: torch.cat(parts) for k, parts in found.items()}


class LegacyVectorQuantizer(VectorQuantizer):
    @torch.no_grad()
    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """The previous VQ search: a fresh distance block per row block."""
        book = self.codebook.weight
        book_sq = book.square().sum(dim=1)
        block = block_rows(rows.device, book.shape[0], LEGACY_BLOCK_ELEMENTS)
        return torch.cat([torch.addmm(book_sq, chunk, book.t(), alpha=-2.0).argmin(dim=1)
                          for chunk in rows.split(block)])


class LegacySubnet(PositionConditionedSubnet):
    def _position_table(self, n_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
        """The previous flow subnet: the position table rebuilt on every call (its cache forgotten first)."""
        self._table_key = None
        return super()._position_table(n_rows, n_cols, device)


def legacy_match_feature_distribution(source: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """The previous EFDM: both sorts by torch (with indices)."""
    b, c, h, w = source.shape
    src = source.reshape(b, c, h * w)
    sorted_src, order = src.sort(dim=-1)
    sorted_tgt, _ = target.reshape(b, c, h * w).sort(dim=-1)
    moved = sorted_src + (sorted_tgt - sorted_src) * (1.0 - alpha)
    return torch.empty_like(src).scatter_(-1, order, moved).reshape(b, c, h, w)


class LegacyResAD(ResAD):
    def distribution_match(self, residuals):
        quantized = self.vq.quantize(residuals)
        return [legacy_match_feature_distribution(r, q, self.fdm_alpha) for r, q in zip(residuals, quantized)]


def legacy_copy(model: ResAD) -> ResAD:
    """A copy of ``model`` (equal parameters) running the implementation before the speed work."""
    with torch.inference_mode(False):  # normal tensors, even when called under inference mode
        old = copy.deepcopy(model)
    old.__class__ = LegacyResAD
    old.matcher = LegacyMatcher()
    for module in old.modules():
        if type(module) is VectorQuantizer:
            module.__class__ = LegacyVectorQuantizer
        elif type(module) is PositionConditionedSubnet:
            module.__class__ = LegacySubnet
    return old


class LegacyReferencePool(TrainReferencePool):
    """The previous pool: every refresh re-encodes the whole pool; batches run the backbone."""

    def _refresh(self, generator: torch.Generator) -> None:
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

    def lookup(self, paths, labels):
        return None

    def banks(self, class_name, paths, shots, generator, exclude_self=False):
        if exclude_self:   # it keeps no path of its pool's images, so it cannot tell an image from its references
            raise ValueError("the previous reference pool has no --train_exclude_self; compare without it")
        return super().banks(class_name, paths, shots, generator)
