"""Reference banks, nearest-reference matching, residual features and EFDM.

A *reference bank* holds, per feature level, the features of the k normal
reference images of one class flattened to a (k*H*W, C) matrix, image-major:
the first H*W rows belong to reference image 1, so a bank of 8 shots can be
cut to its first k shots (SPEC 2.3).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

RESIDUAL_MODES = ("squared", "difference")

# Upper bound on the elements of one similarity block (rows x bank rows) built
# by the matcher.  On a GPU large blocks (2**26 float32 = 256 MiB) keep it busy;
# on a CPU blocks that stay in cache (4 MiB) were 2.5x faster in
# benchmarks/eval_speed.py, as big fresh buffers cost page faults on every call.
_MAX_BLOCK_ELEMENTS = {"cuda": 2 ** 26, "cpu": 2 ** 20}


def block_rows(device: torch.device, row_elements: int) -> int:
    """Rows per block so that a block of ``row_elements``-wide rows fits the device's budget."""
    budget = _MAX_BLOCK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // max(1, row_elements))


def flatten_positions(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), image-major then row-major."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def unflatten_positions(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """(B*H*W, C) -> (B, C, H, W); inverse of :func:`flatten_positions`."""
    return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


class ReferenceBank:
    """Per-level reference features of one class (image-major rows)."""

    def __init__(self, levels: Sequence[torch.Tensor], num_shots: int):
        self.levels: List[torch.Tensor] = [lvl.float() for lvl in levels]
        self.num_shots = int(num_shots)
        for lvl in self.levels:
            if lvl.ndim != 2 or lvl.shape[0] % self.num_shots:
                raise ValueError(f"bank level of shape {tuple(lvl.shape)} is not {self.num_shots} "
                                 "images of equal size")
        self._normalized: List[torch.Tensor] | None = None

    @classmethod
    def from_features(cls, features: Sequence[torch.Tensor]) -> "ReferenceBank":
        """Build from per-level (k, C, H, W) feature maps of the k reference images."""
        return cls([flatten_positions(f) for f in features], num_shots=features[0].shape[0])

    def take(self, shots: int) -> "ReferenceBank":
        """The bank of the first ``shots`` reference images."""
        if not 1 <= shots <= self.num_shots:
            raise ValueError(f"asked for {shots} shots, the bank has {self.num_shots}")
        if shots == self.num_shots:
            return self
        return ReferenceBank([lvl[: lvl.shape[0] // self.num_shots * shots] for lvl in self.levels], shots)

    def select_shots(self, order: Sequence[int]) -> "ReferenceBank":
        """The bank of the reference images ``order`` (indices into the shots), in that order."""
        per_shot = [lvl.shape[0] // self.num_shots for lvl in self.levels]
        return ReferenceBank([torch.cat([lvl[i * n:(i + 1) * n] for i in order])
                              for lvl, n in zip(self.levels, per_shot)], len(order))

    def to(self, device: torch.device | str) -> "ReferenceBank":
        return ReferenceBank([lvl.to(device) for lvl in self.levels], self.num_shots)

    def normalized(self) -> List[torch.Tensor]:
        """L2-normalised rows, computed once per bank."""
        if self._normalized is None:
            self._normalized = [F.normalize(lvl, dim=1) for lvl in self.levels]
        return self._normalized

    @property
    def channels(self) -> List[int]:
        return [lvl.shape[1] for lvl in self.levels]


def nearest_reference_indices(queries: torch.Tensor, bank_normalized: torch.Tensor) -> torch.Tensor:
    """Index of the bank row with the highest cosine similarity to each query row.

    ``bank_normalized`` must have unit rows.  The similarity matrix is built in
    row blocks so that memory stays bounded for large banks.
    """
    queries = F.normalize(queries, dim=1)
    block = block_rows(queries.device, bank_normalized.shape[0])
    bank_t = bank_normalized.t()
    return torch.cat([torch.mm(chunk, bank_t).argmax(dim=1) for chunk in queries.split(block)])


def nearest_reference_indices_by_shots(queries: torch.Tensor, bank_normalized: torch.Tensor, num_shots: int,
                                       shots: Sequence[int]) -> Dict[int, torch.Tensor]:
    """For every k in ``shots``, the index of the most similar row among the first k shots of the bank.

    ``bank_normalized`` holds ``num_shots`` images of equal size, image-major,
    with unit rows.  The similarities are computed ONCE against the whole bank;
    a running maximum over the shot blocks (strictly greater wins, so a tie
    keeps the earlier row) gives, after block k, the first maximal index among
    the first k shots: exactly what ``argmax`` over a k-shot bank returns.
    """
    wanted = sorted(set(int(k) for k in shots))
    if not wanted or wanted[0] < 1 or wanted[-1] > num_shots:
        raise ValueError(f"shots {list(shots)} must lie in 1..{num_shots}")
    rows_per_shot = bank_normalized.shape[0] // num_shots
    last = wanted[-1]
    bank_t = bank_normalized[: last * rows_per_shot].t()
    queries = F.normalize(queries, dim=1)
    block = block_rows(queries.device, last * rows_per_shot)
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


def match_references_by_shots(features: Sequence[torch.Tensor], bank: ReferenceBank,
                              shots: Sequence[int]) -> Dict[int, List[torch.Tensor]]:
    """:func:`match_references` for several k at once (the bank cut to its first k shots), one matching."""
    matched: Dict[int, List[torch.Tensor]] = {int(k): [] for k in shots}
    for feature, rows, rows_n in zip(features, bank.levels, bank.normalized()):
        b, _, h, w = feature.shape
        indices = nearest_reference_indices_by_shots(flatten_positions(feature), rows_n, bank.num_shots, shots)
        for k, idx in indices.items():
            matched[k].append(unflatten_positions(rows[idx], b, h, w))
    return matched


def match_references(features: Sequence[torch.Tensor], bank: ReferenceBank) -> List[torch.Tensor]:
    """For every position, the (un-normalised) reference feature most similar in cosine."""
    matched = []
    for feature, rows, rows_n in zip(features, bank.levels, bank.normalized()):
        b, _, h, w = feature.shape
        idx = nearest_reference_indices(flatten_positions(feature), rows_n)
        matched.append(unflatten_positions(rows[idx], b, h, w))
    return matched


def residual_features(features: Sequence[torch.Tensor], matched: Sequence[torch.Tensor],
                      mode: str = "squared") -> List[torch.Tensor]:
    """Residuals r = (x - x*)^2 (authors' code, default) or r = x - x* (paper)."""
    if mode == "squared":
        return [(f - m).square() for f, m in zip(features, matched)]
    if mode == "difference":
        return [f - m for f, m in zip(features, matched)]
    raise ValueError(f"unknown residual mode {mode!r}; choose from {RESIDUAL_MODES}")


def match_feature_distribution(source: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact feature distribution matching (EFDM), per image and channel.

    The H*W values of each channel of ``source`` are sorted, moved toward the
    equally ranked values of ``target`` by ``1 - alpha``
    (``sorted_s + (sorted_t - sorted_s) * (1 - alpha)``) and put back at the
    positions they came from.  ``alpha = 1`` leaves ``source`` unchanged,
    ``alpha = 0`` gives it exactly the distribution of ``target``.
    """
    b, c, h, w = source.shape
    src = source.reshape(b, c, h * w)
    sorted_src, order = src.sort(dim=-1)
    sorted_tgt, _ = target.reshape(b, c, h * w).sort(dim=-1)
    moved = sorted_src + (sorted_tgt - sorted_src) * (1.0 - alpha)
    return torch.empty_like(src).scatter_(-1, order, moved).reshape(b, c, h, w)
