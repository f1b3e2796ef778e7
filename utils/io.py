"""Result files, checkpoints and reference features, all written atomically.

Every file is written to a temporary name in its destination folder and then
renamed over the final name, so an interrupted run never leaves a truncated
CSV, JSON, checkpoint or feature file behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Dict, Iterator, List, Sequence

import numpy as np
import pandas as pd
import torch

from models.residual import ReferenceBank
from utils.errors import UserError

REFERENCE_META = "meta.json"


def check_writable(path: str, flag: str = "--checkpoint_path") -> str:
    """Check that the folder ``path`` exists and is writable, or can be created; creates nothing."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder; choose another location")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable; choose a writable location")
    return path


def ensure_dir(path: str, flag: str = "--checkpoint_path") -> str:
    """Create the folder ``path`` (and parents) after checking it can be written."""
    check_writable(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create the folder ({err.strerror}); choose a writable location") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder: str) -> int:
    """Delete the temporary files that a killed run left in ``folder``; returns how many."""
    if not os.path.isdir(folder):
        return 0
    stale = [f for f in os.listdir(folder) if f.startswith(".") and f.endswith(".tmp")]
    for name in stale:
        os.remove(os.path.join(folder, name))
    return len(stale)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def save_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(_json_safe(obj), f, indent=2)


def save_csv(path: str, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.5f")


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str, flag: str = "--resume") -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: checkpoint not found; give a <setting>_latest.pth written by main.py")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling errors come in many types
        raise UserError(f"{flag} {path}: cannot read the checkpoint ({type(err).__name__}); "
                        "the file is damaged or not a checkpoint of this project") from None


# --------------------------------------------------------------------------- reference features

def save_reference_features(save_dir: str, class_name: str, features: Sequence[torch.Tensor],
                            meta: dict) -> str:
    """Write ``<save_dir>/<class>/layer{1..L}.npy`` (float32, (k*H*W, C) image-major) and ``meta.json``.

    ``features`` are per-level (k, C, H, W) maps of the k reference images.  The
    class folder is assembled under a temporary name and renamed into place.
    """
    bank = ReferenceBank.from_features(features)
    ensure_dir(save_dir, "--save_dir")
    final = os.path.join(save_dir, class_name)
    staging = tempfile.mkdtemp(prefix=f".{class_name}.", dir=save_dir)
    try:
        for level, rows in enumerate(bank.levels, start=1):
            np.save(os.path.join(staging, f"layer{level}.npy"), rows.cpu().numpy().astype(np.float32))
        with open(os.path.join(staging, REFERENCE_META), "w") as f:
            json.dump(dict(meta, class_name=class_name, num_shots=bank.num_shots), f, indent=2)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return final


def check_reference_dirs(ref_dir: str, class_names: Sequence[str], flag: str = "--test_ref_feature_dir") -> None:
    """UserError unless ``ref_dir`` holds a folder per class (cheap; run before building a backbone)."""
    if not ref_dir:
        raise UserError(f"{flag} is empty: give the folder written by extract_ref_features.py")
    if not os.path.isdir(ref_dir):
        raise UserError(f"{flag} {ref_dir}: folder not found; create it with extract_ref_features.py")
    for class_name in class_names:
        class_dir = os.path.join(ref_dir, class_name)
        if not os.path.isdir(class_dir):
            raise UserError(f"{flag} {ref_dir}: no reference features for class '{class_name}' "
                            f"(expected {class_dir}/layer1.npy); run extract_ref_features.py for this dataset")


def load_reference_bank(ref_dir: str, class_name: str, extractor: dict, num_shots: int,
                        flag: str = "--test_ref_feature_dir") -> ReferenceBank:
    """Load the reference bank of one class and check it against the extractor in use.

    ``extractor`` is :meth:`models.extractor.FeatureExtractor.describe`.  The
    number of shots is derived from the rows of each level and the feature map
    size; ``num_shots`` of them are kept (the first ones).
    """
    check_reference_dirs(ref_dir, [class_name], flag)
    class_dir = os.path.join(ref_dir, class_name)
    meta = {}
    meta_path = os.path.join(class_dir, REFERENCE_META)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("backbone") and meta["backbone"] != extractor["backbone"]:
            raise UserError(f"{flag} {class_dir}: features were extracted with --backbone {meta['backbone']}, "
                            f"this run uses {extractor['backbone']}; re-extract them or pass the same --backbone")
        if meta.get("layers") is not None and list(meta["layers"]) != list(extractor.get("layers", meta["layers"])):
            raise UserError(f"{flag} {class_dir}: features are of {extractor['backbone']} layers {meta['layers']}, "
                            f"this run uses layers {extractor['layers']}; re-extract them with the same "
                            "--feature_levels / --feature_blocks")
    levels: List[torch.Tensor] = []
    shots = None
    for level, (channels, (h, w)) in enumerate(zip(extractor["channels"], extractor["feature_sizes"]), start=1):
        path = os.path.join(class_dir, f"layer{level}.npy")
        if not os.path.isfile(path):
            raise UserError(f"{flag}: missing {path}; re-run extract_ref_features.py for this dataset")
        try:
            rows = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise UserError(f"{flag}: cannot read {path} ({err}); re-run extract_ref_features.py") from None
        if rows.ndim != 2 or rows.shape[1] != channels:
            raise UserError(f"{flag}: {path} has shape {tuple(rows.shape)} but {extractor['backbone']} level {level} "
                            f"has {channels} channels; the features come from another backbone: re-extract them "
                            f"with --backbone {extractor['backbone']}")
        if rows.shape[0] % (h * w):
            raise UserError(f"{flag}: {path} has {rows.shape[0]} rows, not a multiple of the {h}x{w} feature map "
                            f"of {extractor['backbone']} at {extractor['image_size']} px; re-extract the features")
        level_shots = rows.shape[0] // (h * w)
        if shots is not None and level_shots != shots:
            raise UserError(f"{flag}: the layer files of {class_dir} disagree on the number of shots; re-extract them")
        shots = level_shots
        if num_shots > shots:
            raise UserError(f"--num_ref_shot {num_shots}: {class_dir} holds only {shots} shots; "
                            f"lower --num_ref_shot or extract features from more reference images")
        levels.append(torch.from_numpy(np.array(rows[: num_shots * h * w], dtype=np.float32)))
    return ReferenceBank(levels, num_shots)


def load_reference_banks(ref_dir: str, class_names: Sequence[str], extractor: dict, num_shots: int,
                         device: torch.device | str) -> Dict[str, ReferenceBank]:
    return {c: load_reference_bank(ref_dir, c, extractor, num_shots).to(device) for c in class_names}
