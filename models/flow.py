"""Feature distribution estimator: a conditional normalizing flow per level.

Each level has a FrEIA ``SequenceINN`` of ``AllInOneBlock`` coupling blocks
(affine clamping 1.9, SOFTPLUS global affine, soft permutations), conditioned
on a 2-D sine/cosine positional encoding (half of the channels encode the
column x, half the row y).  Every spatial position is one sample.

Speed by design: the encoding is a fixed function of the integer position, so
the flow receives the two coordinates (x, y) as its condition and each coupling
subnet evaluates ``Linear([x_half, PE(x, y)])`` as
``W_x x_half + T_col[x] + T_row[y] + b`` with small per-axis tables
``T = PE_axis @ W_pe^T``.  This is the same function (and the same parameters)
as a Linear layer on the concatenated 256-d encoding, tested against it, but
it skips the (positions x 256 x hidden) product that otherwise dominates the
cost of every block.
"""
from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Tuple

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn as nn

FLOW_ARCHS = ("conditional_flow_model", "flow_model")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def axis_encoding(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine/cosine encoding of integer coordinates: (N,) -> (N, dim), channels interleaved
    ``[sin(c f_0), cos(c f_0), sin(c f_1), ...]`` with ``f_i = 10000^(-2i/dim)``."""
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=coords.device) * (-math.log(1e4) / dim))
    angles = coords.float()[:, None] * freqs[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(coords), dim)


@lru_cache(maxsize=32)
def _axis_table(n: int, dim: int, device: torch.device) -> torch.Tensor:
    """Cached encodings of the coordinates 0..n-1 (constants, recomputed per call otherwise).

    Built as a normal tensor even when first asked for under ``torch.inference_mode()``
    (an evaluation), so that training can use the cached table afterwards (a resumed run)."""
    with torch.inference_mode(False):
        return axis_encoding(torch.arange(n, device=device), dim)


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """The (dim, H, W) encoding: channels [0, dim/2) encode x (column), the rest y (row)."""
    if dim % 4:
        raise ValueError(f"positional encoding dimension must be a multiple of 4, got {dim}")
    half = dim // 2
    enc_x = axis_encoding(torch.arange(width), half).t()[:, None, :].expand(half, height, width)
    enc_y = axis_encoding(torch.arange(height), half).t()[:, :, None].expand(half, height, width)
    return torch.cat([enc_x, enc_y], dim=0)


def grid_coordinates(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H*W, 2) float tensor of (x, y) per position, row-major like :func:`flatten_positions`."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float()


class PositionConditionedSubnet(nn.Module):
    """Linear(d + P, 2(d + P)) - ReLU - Linear(2(d + P), out) on ``[x, PE(x, y)]``.

    The input is ``[x (d columns), x-coordinate, y-coordinate]`` as FrEIA hands
    it over (the condition concatenated to the first half of the features).
    """

    def __init__(self, dims_in: int, dims_out: int, pos_embed_dim: int = 256):
        super().__init__()
        if pos_embed_dim % 4:
            raise ValueError(f"--pos_embed_dim must be a multiple of 4, got {pos_embed_dim}")
        self.feature_dim = dims_in - 2
        self.pos_embed_dim = pos_embed_dim
        width = self.feature_dim + pos_embed_dim
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, dims_out)
        self._table_key, self._table = None, None  # see _position_table

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        d = self.feature_dim
        x, cols, rows = inputs[:, :d], inputs[:, d].long(), inputs[:, d + 1].long()
        weight = self.fc1.weight
        n_cols, n_rows = int(cols.max()) + 1, int(rows.max()) + 1
        table = self._position_table(n_rows, n_cols, x.device)
        # index_select: its backward (index_add) is ~2x faster on a CPU than that of table[idx]
        hidden = torch.index_select(table, 0, rows * n_cols + cols).addmm_(x, weight[:, :d].t())
        return self.fc2(hidden.relu_())

    def _position_table(self, n_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
        """The (rows*cols, hidden) table of the position term of fc1, bias included (one gather per call).

        Without gradients (evaluation) the table is kept between calls until fc1 changes: an
        image's positions come in several chunks and the table was rebuilt for each (a third of
        the level-1 flow's time).  The key holds the parameters' version counters, which every
        in-place update (optimizer step, ``load_state_dict``) advances."""
        weight, bias = self.fc1.weight, self.fc1.bias
        key = (n_rows, n_cols, device, weight._version, bias._version, weight.data_ptr(),
               torch.is_inference_mode_enabled())
        if not torch.is_grad_enabled() and self._table_key == key:
            return self._table
        d, half = self.feature_dim, self.pos_embed_dim // 2
        table_x = _axis_table(n_cols, half, device) @ weight[:, d:d + half].t()
        table_y = _axis_table(n_rows, half, device) @ weight[:, d + half:].t()
        table = (table_y[:, None, :] + (table_x + bias)[None, :, :]).reshape(n_rows * n_cols, -1)
        if torch.is_grad_enabled():
            self._table_key = self._table = None
        else:
            self._table_key, self._table = key, table
        return table


def mlp_subnet(dims_in: int, dims_out: int) -> nn.Module:
    """The authors' unconditional subnet: Linear(d, 2d) - ReLU - Linear(2d, out)."""
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


class LevelFlow(nn.Module):
    """The normalizing flow of one feature level: rows (N, C) + coordinates (N, 2) -> z, log|det J|."""

    def __init__(self, channels: int, coupling_layers: int = 10, clamp_alpha: float = 1.9,
                 pos_embed_dim: int = 256, arch: str = "conditional_flow_model"):
        super().__init__()
        if arch not in FLOW_ARCHS:
            raise ValueError(f"unknown flow architecture {arch!r}; choose from {FLOW_ARCHS}")
        self.conditional = arch == "conditional_flow_model"
        self.inn = Ff.SequenceINN(channels)
        block_args = dict(affine_clamping=clamp_alpha, global_affine_type="SOFTPLUS", permute_soft=True)
        if self.conditional:
            block_args.update(cond=0, cond_shape=(2,),
                              subnet_constructor=partial(PositionConditionedSubnet, pos_embed_dim=pos_embed_dim))
        else:
            block_args.update(subnet_constructor=mlp_subnet)
        for _ in range(coupling_layers):
            self.inn.append(Fm.AllInOneBlock, **block_args)

    def forward(self, rows: torch.Tensor, coords: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.conditional:
            return self.inn(rows, c=[coords])
        return self.inn(rows)


def log_likelihoods(z: torch.Tensor, log_det: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension log-likelihoods under N(0, I) ("normal") and N(1, I) ("abnormal")."""
    c = z.shape[1]
    base = log_det - c * _HALF_LOG_2PI
    logp = (base - 0.5 * z.square().sum(dim=1)) / c
    logp_a = (base - 0.5 * (z - 1.0).square().sum(dim=1)) / c
    return logp, logp_a
