"""Seeding and random-state capture (for exact resume).

The captured states hold only tensors and plain values (lists, strings,
numbers), so a checkpoint that stores them loads with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (FrEIA draws its permutations from it) and PyTorch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def numpy_state_to_plain(state) -> dict:
    """NumPy's global random state (legacy tuple or dict form) as plain values."""
    if isinstance(state, tuple):  # ('MT19937', keys, pos, has_gauss, cached_gaussian)
        name, keys, pos, has_gauss, gauss = state
        state = {"bit_generator": name, "state": {"key": keys, "pos": pos}, "has_gauss": has_gauss, "gauss": gauss}
    return {"bit_generator": str(state["bit_generator"]),
            "state": {"key": [int(k) for k in np.asarray(state["state"]["key"])], "pos": int(state["state"]["pos"])},
            "has_gauss": int(state["has_gauss"]), "gauss": float(state["gauss"])}


def rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": numpy_state_to_plain(np.random.get_state(legacy=False)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = numpy_state_to_plain(state["numpy"])
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
