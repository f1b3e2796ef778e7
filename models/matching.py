"""Reference banks and the nearest-reference search (docs/method.md §2.3, §2.4, §6, §7).

A :class:`ReferenceBank` holds, per feature level, the features of the k normal
reference images of one class flattened to a (k*H*W, C) matrix, image-major:
the first H*W rows belong to reference image 1, so a bank of 8 shots can be
cut to its first k shots.

A :class:`Matcher` finds, for every query row, the bank row of highest cosine
similarity (ties to the first row, as ``argmax``), exactly, for one bank or for
every prefix of k shots of a bank at once; the same search finds the nearest row in
Euclidean distance (:meth:`Matcher.nearest_euclidean_by_shots`, the kNN baseline's).  Its
tuning (tile sizes, block budget, an approximate similarity dtype) is a constructor argument.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from models.positions import flatten_positions, unflatten_positions

# Upper bound on the elements of one similarity block (rows x bank rows) built
# by the certified matcher and the VQ search.  GPU: large blocks keep it busy.  CPU: with the
# heap-reusing allocator (utils.runtime.tune_cpu_allocator) 8M-element blocks
# took half the time of 1M-element ones (fewer, larger products and arg-max passes).
BLOCK_ELEMENTS = {"cuda": 2 ** 26, "cpu": 2 ** 23}

# Matcher precision per device: None = float32 products throughout; a 16-bit
# dtype = similarities in that dtype, then the candidates that the proven error
# bound cannot rule out are re-scored exactly (see certified_argmax_rows).
APPROXIMATE_SIMILARITY_DTYPE = {"cuda": torch.float16, "cpu": None}

# The float32 matcher's tiles: (elements, widest column tile).  CPU: tiles of 2M similarities
# (8 MB, e.g. 2,674 query rows x 784 bank rows) in one reused buffer; tiles of 1M to 4M elements
# and 512 to 2,048 columns were within 10 % of each other, 8M-element row blocks slower
# (docs/performance.md).  CUDA: large row blocks, no column tiles.
MATCH_TILE = {"cuda": (2 ** 26, None), "cpu": (2 ** 21, 1024)}


def device_kind(device: torch.device) -> str:
    """The key of the per-device tuning tables: "cuda" or "cpu"."""
    return "cuda" if device.type == "cuda" else "cpu"


def block_rows(device: torch.device, row_elements: int, budget: Optional[Dict[str, int]] = None) -> int:
    """Rows per block so that a block of ``row_elements``-wide rows fits the device's element budget."""
    elements = (budget or BLOCK_ELEMENTS)[device_kind(device)]
    return max(1, elements // max(1, row_elements))


def similarity_error_bound(dtype: torch.dtype, dim: int) -> float:
    """Proven bound on |approx - exact| of the dot product of two (near-)unit vectors of length ``dim``
    when both are rounded to ``dtype``, multiplied with float32 accumulation and the result rounded to ``dtype``.

    With unit round-off u and smallest subnormal step s of ``dtype``: each rounded entry is
    ``a_i (1 + d_i) + e_i`` with ``|d_i| <= u``, ``|e_i| <= s / 2``; by Cauchy-Schwarz the rounded
    inputs change the product by at most ``2u + u^2 + s sqrt(dim)`` (plus second-order terms);
    the float32 accumulation adds at most ``dim 2^-24 (1 + 3u)``, the rounding of a result of
    magnitude at most 1.01 another ``1.01 u``.  A 2 % margin covers row norms of 1 +- 1e-6.
    """
    info = torch.finfo(dtype)
    u = info.eps / 2
    tiny = info.smallest_normal * info.eps  # the subnormal step
    inputs = 2 * u + u * u + tiny * math.sqrt(dim) * (1 + u)
    accumulation = dim * 2.0 ** -24 * (1 + 3 * u)
    output = 1.01 * u
    return 1.02 * (inputs + accumulation + output)


@contextlib.contextmanager
def float32_accumulation() -> Iterator[None]:
    """Half-precision products accumulated in float32, as :func:`similarity_error_bound` assumes: PyTorch by
    default lets CUDA reduce float16 (and bfloat16) products in reduced precision
    (``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction``), whose error the bound does not
    cover; this turns that off for the block and restores the setting after."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved


def certified_argmax_rows(queries: torch.Tensor, bank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-wise arg-max of ``queries @ bank.T`` for unit rows, exact, from ``dtype`` similarities.

    The block of similarities is computed in ``dtype`` (fast tensor-core products on a GPU);
    every bank row whose approximate similarity is within twice the proven error bound of
    the row's approximate maximum could still be the exact maximum, so exactly those
    candidates are re-scored from the float32 inputs (in float64) and the best one is
    taken (the lowest index among exact ties, like ``argmax``).  Any row outside the
    candidates is provably below the best candidate, so the result is the exact arg-max.
    """
    with float32_accumulation():
        approx = torch.mm(queries.to(dtype), bank.t().to(dtype)).float()
    best = approx.max(dim=1, keepdim=True).values
    slack = 2 * similarity_error_bound(dtype, queries.shape[1])
    rows, cols = torch.nonzero(approx >= best - slack, as_tuple=True)
    del approx
    exact = (queries[rows].double() * bank[cols].double()).sum(dim=1)
    top = torch.full((queries.shape[0],), -math.inf, dtype=torch.float64, device=queries.device)
    top.scatter_reduce_(0, rows, exact, reduce="amax")
    winners = exact == top[rows]
    first = torch.full((queries.shape[0],), bank.shape[0], dtype=torch.long, device=queries.device)
    return first.scatter_reduce_(0, rows[winners], cols[winners], reduce="amin")


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


def _column_tiles(bounds: Sequence[int], width: Optional[int]) -> List[Tuple[int, int]]:
    """Cut each segment [bounds[i-1], bounds[i]) into near-equal tiles of at most ``width`` columns."""
    tiles, low = [], 0
    for high in bounds:
        parts = 1 if width is None else -(-(high - low) // width)
        edges = [low + (high - low) * p // parts for p in range(parts + 1)]
        tiles += list(zip(edges[:-1], edges[1:]))
        low = high
    return tiles


class Matcher:
    """Exact nearest-reference search in cosine similarity; ties go to the first bank row.

    ``tiles``, ``blocks`` and ``approximate`` override, per device kind ("cpu", "cuda"),
    the float32 tiles (:data:`MATCH_TILE`), the certified matcher's block budget
    (:data:`BLOCK_ELEMENTS`) and its approximate dtype (:data:`APPROXIMATE_SIMILARITY_DTYPE`).
    Every setting gives the same indices; they only change the speed.
    """

    def __init__(self, tiles: Optional[Dict[str, Tuple[int, Optional[int]]]] = None,
                 blocks: Optional[Dict[str, int]] = None,
                 approximate: Optional[Dict[str, Optional[torch.dtype]]] = None):
        self.tiles = {**MATCH_TILE, **(tiles or {})}
        self.blocks = {**BLOCK_ELEMENTS, **(blocks or {})}
        self.approximate = {**APPROXIMATE_SIMILARITY_DTYPE, **(approximate or {})}

    def similarity_argmax(self, queries: torch.Tensor, bank_t: torch.Tensor,
                          bounds: Sequence[int]) -> List[torch.Tensor]:
        """For each column bound b in ``bounds`` (increasing), the row-wise arg-max of ``queries @ bank_t``
        over the columns [0, b), the first maximal column among exact ties (``argmax``'s rule).

        The similarities are built tile by tile (rows x columns, ``self.tiles``) into ONE reused
        buffer (``torch.mm(..., out=)``), and each tile's row maxima are merged into a running
        maximum in column order, a later tile winning only when strictly greater, so every prefix
        keeps its first maximal index; after the first tile only the rows a tile strictly improves
        (found with the cheap value-only ``amax``) pay for an index search.  On a CPU the product
        is memory-bound (24 to 112 channels against tens of thousands of bank rows): a fresh block
        per product (page faults), a block larger than the caches and an index-tracking reduction
        over every similarity cost twice the time of this.  Each similarity is the same float32
        dot product either way, so the indices are those of the plain product.
        """
        elements, width = self.tiles[device_kind(queries.device)]
        tiles = _column_tiles(bounds, width)
        widest = max(high - low for low, high in tiles)
        block = max(1, elements // widest)
        ends = {high: i for i, high in enumerate(bounds)}
        buffer = queries.new_empty((min(block, queries.shape[0]), widest))
        found: List[List[torch.Tensor]] = [[] for _ in bounds]
        for chunk in queries.split(block):
            best_value = best_index = None
            for low, high in tiles:
                similarity = torch.mm(chunk, bank_t[:, low:high], out=buffer[: chunk.shape[0], : high - low])
                if best_index is None:
                    best_value, best_index = similarity.max(dim=1)
                else:
                    _merge_tile(similarity, low, best_value, best_index)
                if high in ends:
                    found[ends[high]].append(best_index.clone())
        return [torch.cat(parts) for parts in found]

    def nearest(self, queries: torch.Tensor, bank_normalized: torch.Tensor) -> torch.Tensor:
        """Index of the bank row with the highest cosine similarity to each query row.

        ``bank_normalized`` must have unit rows.  On devices with an approximate similarity
        dtype (CUDA: float16) each block goes through :func:`certified_argmax_rows`, which
        returns the same exact arg-max.
        """
        queries = F.normalize(queries, dim=1)
        dtype = self.approximate[device_kind(queries.device)]
        if dtype is not None:
            block = block_rows(queries.device, bank_normalized.shape[0], self.blocks)
            return torch.cat([certified_argmax_rows(chunk, bank_normalized, dtype) for chunk in queries.split(block)])
        return self.similarity_argmax(queries, bank_normalized.t(), [bank_normalized.shape[0]])[0]

    def nearest_by_shots(self, queries: torch.Tensor, bank_normalized: torch.Tensor, num_shots: int,
                         shots: Sequence[int]) -> Dict[int, torch.Tensor]:
        """For every k in ``shots``, the index of the most similar row among the first k shots of the bank.

        ``bank_normalized`` holds ``num_shots`` images of equal size, image-major, with unit
        rows.  The similarities are computed ONCE against the first max(shots) shots; the maxima
        over the column segments between consecutive wanted k are merged in order (strictly
        greater wins, so a tie keeps the earlier row): for each k the first maximal index among
        the first k shots, exactly what ``argmax`` over a k-shot bank returns.
        """
        wanted = sorted(set(int(k) for k in shots))
        if not wanted or wanted[0] < 1 or wanted[-1] > num_shots:
            raise ValueError(f"shots {list(shots)} must lie in 1..{num_shots}")
        rows_per_shot = bank_normalized.shape[0] // num_shots
        indices = self.similarity_argmax(F.normalize(queries, dim=1), bank_normalized.t(),
                                         [k * rows_per_shot for k in wanted])
        return dict(zip(wanted, indices))

    def nearest_euclidean_by_shots(self, queries: torch.Tensor, bank_rows: torch.Tensor, num_shots: int,
                                   shots: Sequence[int]) -> Dict[int, torch.Tensor]:
        """For every k in ``shots``, the index of the bank row nearest in Euclidean distance to each query
        row among the first k shots of ``bank_rows`` (``num_shots`` images of equal size, image-major).

        The same tiled search as :meth:`nearest_by_shots`, on augmented rows: ``[q, 1] . [b, -|b|^2 / 2]
        = q.b - |b|^2 / 2 = (|q|^2 - |q - b|^2) / 2``, so per query the largest product is the smallest
        distance (``|q|^2`` is constant along a row).  Ties in the computed products go to the first row.
        """
        wanted = sorted(set(int(k) for k in shots))
        if not wanted or wanted[0] < 1 or wanted[-1] > num_shots:
            raise ValueError(f"shots {list(shots)} must lie in 1..{num_shots}")
        rows_per_shot = bank_rows.shape[0] // num_shots
        bank_rows = bank_rows[: wanted[-1] * rows_per_shot].float()
        half_norms = bank_rows.double().square().sum(dim=1).mul(-0.5).float()
        bank_t = torch.cat([bank_rows, half_norms[:, None]], dim=1).t()
        augmented = torch.cat([queries.float(), queries.new_ones((queries.shape[0], 1), dtype=torch.float32)], dim=1)
        indices = self.similarity_argmax(augmented, bank_t, [k * rows_per_shot for k in wanted])
        return dict(zip(wanted, indices))

    def match(self, features: Sequence[torch.Tensor], bank: ReferenceBank) -> List[torch.Tensor]:
        """For every position, the (un-normalised) reference feature most similar in cosine."""
        matched = []
        for feature, rows, rows_n in zip(features, bank.levels, bank.normalized()):
            b, _, h, w = feature.shape
            matched.append(unflatten_positions(rows[self.nearest(flatten_positions(feature), rows_n)], b, h, w))
        return matched

    def match_by_shots(self, features: Sequence[torch.Tensor], bank: ReferenceBank,
                       shots: Sequence[int]) -> Dict[int, List[torch.Tensor]]:
        """:meth:`match` for several k at once (the bank cut to its first k shots), one matching."""
        matched: Dict[int, List[torch.Tensor]] = {int(k): [] for k in shots}
        for feature, rows, rows_n in zip(features, bank.levels, bank.normalized()):
            b, _, h, w = feature.shape
            indices = self.nearest_by_shots(flatten_positions(feature), rows_n, bank.num_shots, shots)
            for k, idx in indices.items():
                matched[k].append(unflatten_positions(rows[idx], b, h, w))
        return matched


def _merge_tile(similarity: torch.Tensor, low: int, best_value: torch.Tensor, best_index: torch.Tensor) -> None:
    """Merge one tile's row maxima into the running maximum, in place; the index-tracking
    reduction costs 10x the value-only one (amax), so only rows the tile strictly improves pay for it."""
    value = similarity.amax(dim=1)
    better = torch.nonzero(value > best_value).squeeze(1)
    if better.numel():
        best_value[better] = value[better]
        best_index[better] = similarity.index_select(0, better).argmax(dim=1) + low


DEFAULT_MATCHER = Matcher()


def nearest_reference_indices(queries: torch.Tensor, bank_normalized: torch.Tensor) -> torch.Tensor:
    """:meth:`Matcher.nearest` with the default tuning."""
    return DEFAULT_MATCHER.nearest(queries, bank_normalized)


def nearest_reference_indices_by_shots(queries: torch.Tensor, bank_normalized: torch.Tensor, num_shots: int,
                                       shots: Sequence[int]) -> Dict[int, torch.Tensor]:
    """:meth:`Matcher.nearest_by_shots` with the default tuning."""
    return DEFAULT_MATCHER.nearest_by_shots(queries, bank_normalized, num_shots, shots)


def match_references(features: Sequence[torch.Tensor], bank: ReferenceBank) -> List[torch.Tensor]:
    """:meth:`Matcher.match` with the default tuning."""
    return DEFAULT_MATCHER.match(features, bank)
