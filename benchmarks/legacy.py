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
import torch.nn.functional as F
from tqdm import tqdm

import models.flow as flow
import models.resad as resad
import models.residual as residual
from models.vq import VectorQuantizer
from utils.loaders import make_loader
from utils.training import TrainReferencePool


LEGACY_BLOCK_ELEMENTS = {"cuda": 2 ** 26, "cpu": 2 ** 20}


def legacy_nearest_reference_indices(queries: torch.Tensor, bank_normalized: torch.Tensor) -> torch.Tensor:
    """The previous matcher: one fresh similarity block per row block, ``argmax`` over it."""
    queries = F.normalize(queries, dim=1)
    block = residual.block_rows(queries.device, bank_normalized.shape[0])
    bank_t = bank_normalized.t()
    return torch.cat([torch.mm(chunk, bank_t).argmax(dim=1) for chunk in queries.split(block)])


def legacy_nearest_reference_indices_by_shots(queries: torch.Tensor, bank_normalized: torch.Tensor,
                                              num_shots: int, shots) -> Dict[int, torch.Tensor]:
    """The previous prefix matcher: fresh blocks, an index-tracking maximum per shot, merged in order."""
    wanted = sorted(set(int(k) for k in shots))
    rows_per_shot = bank_normalized.shape[0] // num_shots
    last = wanted[-1]
    bank_t = bank_normalized[: last * rows_per_shot].t()
    queries = F.normalize(queries, dim=1)
    block = residual.block_rows(queries.device, last * rows_per_shot)
    found: Dict[int, List[torch.Tensor]] = {k: [] for k in wanted}
    for chunk in queries.split(block):
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


@torch.no_grad()
def legacy_vq_nearest(self: VectorQuantizer, rows: torch.Tensor) -> torch.Tensor:
    """The previous VQ search: a fresh distance block per row block."""
    book = self.codebook.weight
    book_sq = book.square().sum(dim=1)
    block = residual.block_rows(rows.device, book.shape[0])
    return torch.cat([torch.addmm(book_sq, chunk, book.t(), alpha=-2.0).argmin(dim=1) for chunk in rows.split(block)])


def legacy_match_feature_distribution(source: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """The previous EFDM: both sorts by torch (with indices)."""
    b, c, h, w = source.shape
    src = source.reshape(b, c, h * w)
    sorted_src, order = src.sort(dim=-1)
    sorted_tgt, _ = target.reshape(b, c, h * w).sort(dim=-1)
    moved = sorted_src + (sorted_tgt - sorted_src) * (1.0 - alpha)
    return torch.empty_like(src).scatter_(-1, order, moved).reshape(b, c, h, w)


_cached_position_table = flow.PositionConditionedSubnet._position_table


def legacy_position_table(self: flow.PositionConditionedSubnet, n_rows: int, n_cols: int,
                          device: torch.device) -> torch.Tensor:
    """The previous flow subnet: the position table rebuilt on every call (its cache forgotten first)."""
    self._table_key = None
    return _cached_position_table(self, n_rows, n_cols, device)


@contextlib.contextmanager
def legacy_matching():
    """Within: the implementation before the speed work of issue 9 for matching (1M-element
    fresh blocks, float32 products only, index-tracking maxima), the VQ search, EFDM's sorts and
    the flows' position tables (rebuilt per call)."""
    saved = dict(residual._MAX_BLOCK_ELEMENTS), dict(residual.APPROXIMATE_SIMILARITY_DTYPE)
    residual._MAX_BLOCK_ELEMENTS.update(LEGACY_BLOCK_ELEMENTS)
    residual.APPROXIMATE_SIMILARITY_DTYPE.update({"cuda": None, "cpu": None})
    patches = [(residual, "nearest_reference_indices", legacy_nearest_reference_indices),
               (residual, "nearest_reference_indices_by_shots", legacy_nearest_reference_indices_by_shots),
               (VectorQuantizer, "nearest", legacy_vq_nearest),
               (resad, "match_feature_distribution", legacy_match_feature_distribution),
               (flow.PositionConditionedSubnet, "_position_table", legacy_position_table)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
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
