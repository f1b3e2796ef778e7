"""Vector-quantisation codebooks of normal residuals (ResAD++ distribution matching).

One codebook per feature level is learned on the residuals of NORMAL positions
with the standard VQ objective ``||sg[q] - r||^2 + beta * ||q - sg[r]||^2``.
At inference each residual map is quantised (nearest codebook entry per
position) and the residuals are moved toward the quantised map by EFDM
(see :func:`models.residual.match_feature_distribution`).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from models.matching import block_rows
from models.positions import flatten_positions, unflatten_positions


class VectorQuantizer(nn.Module):
    """A codebook of ``num_embeddings`` vectors of size ``dim``."""

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    @torch.no_grad()
    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """Index of the closest codebook entry (Euclidean) for each row of (N, dim)."""
        book = self.codebook.weight
        # argmin ||r - e||^2 = argmin (||e||^2 - 2 r.e): one matmul per block.
        book_sq = book.square().sum(dim=1)
        block = block_rows(rows.device, book.shape[0])
        # one reused block buffer (out=), as in models.residual._similarity_argmax
        buffer = rows.new_empty((min(block, rows.shape[0]), book.shape[0]))
        return torch.cat([torch.addmm(book_sq, chunk, book.t(), alpha=-2.0, out=buffer[: chunk.shape[0]]).argmin(dim=1)
                          for chunk in rows.split(block)])

    def loss(self, residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """VQ loss on the normal positions (mask == 0) of a (B, C, H, W) residual map."""
        rows = flatten_positions(residual)[mask.reshape(-1) == 0]
        if rows.shape[0] == 0:
            return residual.new_zeros(())
        quantized = self.codebook(self.nearest(rows))
        return (quantized.detach() - rows).square().mean() + self.beta * (quantized - rows.detach()).square().mean()

    @torch.no_grad()
    def quantize(self, residual: torch.Tensor) -> torch.Tensor:
        """Replace every position of a (B, C, H, W) map by its nearest codebook entry."""
        b, _, h, w = residual.shape
        return unflatten_positions(self.codebook(self.nearest(flatten_positions(residual))), b, h, w)


class MultiScaleVQ(nn.Module):
    """One :class:`VectorQuantizer` per feature level."""

    def __init__(self, channels: Sequence[int], num_embeddings: int = 1536, beta: float = 0.25):
        super().__init__()
        self.levels = nn.ModuleList([VectorQuantizer(num_embeddings, c, beta) for c in channels])

    def loss(self, residuals: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(vq.loss(r, m) for vq, r, m in zip(self.levels, residuals, masks))

    def quantize(self, residuals: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [vq.quantize(r) for vq, r in zip(self.levels, residuals)]
