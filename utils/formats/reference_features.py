"""Reference features of the unseen classes: the files, written, read and checked here only.

``<ref_dir>/<class>/layer1.npy ... layerN.npy``: one per feature level, float32,
``(k*H*W, C)`` image-major (docs/method.md §2.3, §9.3), so a bank of 8 shots serves
any k <= 8; ``meta.json``: the backbone and its layers, channels, feature sizes,
pre-processing (normalisation, ``resize``) and precision (``amp``), the images, the
number of shots and the SHA-256 of each layer file.  The authors' files without
``meta.json`` load unchecked; a ``meta.json`` without ``amp`` or ``resize`` reads as
written with "none" and "crop" (:data:`models.extractor.RECORD_DEFAULTS`).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from models.extractor import RECORD_DEFAULTS, backbone_mismatch
from models.matching import ReferenceBank
from utils.atomic import atomic_folder, ensure_dir, file_sha256
from utils.errors import UserError

META = "meta.json"
FLAG = "--test_ref_feature_dir"
REEXTRACT = "re-run extract_ref_features.py for this dataset"


def save(save_dir: str, class_name: str, features: Sequence[torch.Tensor], meta: dict) -> str:
    """Write the class folder: ``layer{1..L}.npy`` of per-level (k, C, H, W) ``features`` and ``meta.json``
    (``meta`` plus the class, the number of shots and each layer file's SHA-256), assembled under a
    temporary name and renamed into place."""
    bank = ReferenceBank.from_features(features)
    ensure_dir(save_dir, "--save_dir")
    final = os.path.join(save_dir, class_name)
    with atomic_folder(final) as staging:
        digests = {}
        for level, rows in enumerate(bank.levels, start=1):
            name = f"layer{level}.npy"
            np.save(os.path.join(staging, name), rows.cpu().numpy().astype(np.float32))
            digests[name] = file_sha256(os.path.join(staging, name))
        with open(os.path.join(staging, META), "w") as f:
            json.dump(dict(meta, class_name=class_name, num_shots=bank.num_shots, sha256=digests), f, indent=2)
    return final


def check_dirs(ref_dir: str, class_names: Sequence[str], flag: str = FLAG) -> None:
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


def read_meta(ref_dir: str, class_name: str, flag: str = FLAG) -> dict:
    """The ``meta.json`` of one class ({} for the authors' files without one)."""
    path = os.path.join(ref_dir, class_name, META)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag}: cannot read {path} ({type(err).__name__}); {REEXTRACT}") from None


def check_backbone(ref_dir: str, class_name: str, meta: dict, backbone: dict, whose: str = "",
                   flag: str = FLAG) -> None:
    """UserError unless the features of ``meta`` come from the backbone ``backbone`` (a
    :meth:`FeatureExtractor.describe`, or at least its ``backbone`` name): name, layers, ``amp`` and
    ``resize``.  ``whose`` says who wants that backbone (default: this run); ``flag`` names the folder's flag."""
    class_dir = os.path.join(ref_dir, class_name)
    name = backbone["backbone"]
    differs = backbone_mismatch(meta, backbone, ("backbone", "layers", "amp", "resize"))
    if differs == "backbone":
        raise UserError(f"{flag} {class_dir}: features were extracted with --backbone {meta['backbone']}, but "
                        f"{whose or f'this run uses {name}'}; re-extract them with that backbone or pass the "
                        "same --backbone")
    if differs == "layers":
        raise UserError(f"{flag} {class_dir}: features are of {name} layers {meta['layers']}, this run uses "
                        f"layers {backbone['layers']}; re-extract them with the same --feature_levels / "
                        "--feature_blocks")
    if differs == "amp":
        made, wanted = meta.get("amp", "none"), backbone["amp"]
        raise UserError(f"{flag} {class_dir}: features were extracted with --amp {made}, this run uses --amp "
                        f"{wanted}; re-extract them with extract_ref_features.py --amp {wanted} or run with --amp {made}")
    if differs == "resize":
        made, wanted = meta.get("resize", RECORD_DEFAULTS["resize"]), backbone["resize"]
        raise UserError(f"{flag} {class_dir}: features were extracted with --resize {made}, this run uses --resize "
                        f"{wanted}; re-extract them with extract_ref_features.py --resize {wanted} or run with "
                        f"--resize {made}")


def load_bank(ref_dir: str, class_name: str, extractor: dict, num_shots: Optional[int],
              shots_flag: str = "--num_ref_shot", flag: str = FLAG) -> ReferenceBank:
    """The reference bank of one class, checked against the extractor in use (:meth:`FeatureExtractor.describe`).

    The number of shots is derived from the rows of each level and the feature map size;
    ``num_shots`` of them are kept (the first ones), all of them when None.  ``flag`` names the
    folder's flag in messages.
    """
    check_dirs(ref_dir, [class_name], flag)
    meta = read_meta(ref_dir, class_name, flag)
    check_backbone(ref_dir, class_name, meta, extractor, flag=flag)
    levels: List[torch.Tensor] = []
    shots = None
    for level, (channels, (h, w)) in enumerate(zip(extractor["channels"], extractor["feature_sizes"]), start=1):
        rows = _layer_rows(ref_dir, class_name, level, meta, channels, extractor, flag)
        if rows.shape[0] % (h * w):
            raise UserError(f"{flag}: {_layer_path(ref_dir, class_name, level)} has {rows.shape[0]} rows, not a "
                            f"multiple of the {h}x{w} feature map of {extractor['backbone']} at "
                            f"{extractor['image_size']} px; re-extract the features")
        if shots is not None and rows.shape[0] // (h * w) != shots:
            raise UserError(f"{flag}: the layer files of {os.path.join(ref_dir, class_name)} disagree on the number "
                            "of shots; re-extract them")
        shots = rows.shape[0] // (h * w)
        keep = shots if num_shots is None else num_shots
        if keep > shots:
            raise UserError(f"{shots_flag} {keep}: {os.path.join(ref_dir, class_name)} holds only {shots} shots; "
                            f"lower {shots_flag} or extract features from more reference images")
        levels.append(torch.from_numpy(np.array(rows[: keep * h * w], dtype=np.float32)))
    return ReferenceBank(levels, keep)


def _layer_path(ref_dir: str, class_name: str, level: int) -> str:
    return os.path.join(ref_dir, class_name, f"layer{level}.npy")


def _layer_rows(ref_dir: str, class_name: str, level: int, meta: dict, channels: int, extractor: dict,
                flag: str = FLAG) -> np.ndarray:
    """The memory-mapped rows of one layer file, after its checksum and channel checks."""
    path = _layer_path(ref_dir, class_name, level)
    if not os.path.isfile(path):
        raise UserError(f"{flag}: missing {path}; {REEXTRACT}")
    expected = meta.get("sha256", {}).get(os.path.basename(path))
    if expected and file_sha256(path) != expected:
        raise UserError(f"{flag}: {path} was changed or truncated after extraction (its SHA-256 differs "
                        f"from {os.path.join(ref_dir, class_name, META)}); {REEXTRACT}")
    try:
        rows = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise UserError(f"{flag}: cannot read {path} ({err}); re-run extract_ref_features.py") from None
    if rows.ndim != 2 or rows.shape[1] != channels:
        raise UserError(f"{flag}: {path} has shape {tuple(rows.shape)} but {extractor['backbone']} level {level} "
                        f"has {channels} channels; the features come from another backbone: re-extract them "
                        f"with --backbone {extractor['backbone']}")
    return rows


def load_banks(ref_dir: str, class_names: Sequence[str], extractor: dict, shots: Sequence[int], all_shots: bool,
               device: torch.device | str, shots_flag: str = "--num_ref_shot") -> Dict[str, ReferenceBank]:
    """The banks of ``class_names``, read and checked once each before any is moved to ``device``: the
    first max(``shots``) shots, or every saved shot when ``all_shots`` (reference groups draw from them)."""
    banks = {}
    for name in class_names:
        bank = load_bank(ref_dir, name, extractor, None if all_shots else max(shots), shots_flag)
        if bank.num_shots < max(shots):
            raise UserError(f"{shots_flag} {max(shots)}: {os.path.join(ref_dir, name)} holds only {bank.num_shots} "
                            f"shots; lower {shots_flag} or extract features from more reference images")
        banks[name] = bank
    return {name: bank.to(device) for name, bank in banks.items()}
