"""The calibration file of a class (:class:`models.calibration.Calibration`): written once, checked on every use.

``calibration-<model>.json`` (``<model>``: the first 12 hex digits of the model's fingerprint) holds

* ``format`` :data:`FORMAT` and ``version`` :data:`VERSION`;
* ``identity``: what it was made from and for: the model's and the references' SHA-256 fingerprints
  (:func:`model_fingerprint`, :func:`bank_fingerprint`), the number of references, the backbone, its
  pre-processing, the EFDM strength, the smoothing and the image size;
* ``shots``, ``rule`` and, per map kind, its ``statistics`` and the references' image scores.

It is plain JSON, so loading it runs no code.  A file whose identity differs from the current one (another
checkpoint, other references, other options) is never used: :func:`load` says why, and the caller
computes a new calibration and replaces it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from models.anomaly_map import LevelMoments, MapStatistics
from models.calibration import Calibration
from models.matching import ReferenceBank
from utils.atomic import save_json

FORMAT = "resad-calibration"
VERSION = 1


def model_fingerprint(state_dict: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes and values), whatever file holds them."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def bank_fingerprint(bank: ReferenceBank) -> str:
    """SHA-256 of a reference bank's features (float32, level by level) and its number of shots."""
    digest = hashlib.sha256(f"shots:{bank.num_shots};".encode())
    for level in bank.levels:
        rows = level.detach().float().cpu().contiguous()
        digest.update(f"{tuple(rows.shape)};".encode())
        digest.update(rows.numpy().tobytes())
    return digest.hexdigest()


def file_name(identity: dict) -> str:
    return f"calibration-{identity['model'][:12]}.json"


def _statistics_to_plain(statistics) -> dict:
    if isinstance(statistics, MapStatistics):
        return {"level_max": list(statistics.level_max), "normality_max": statistics.normality_max}
    return {"terms": [{"mean": list(m.mean), "std": list(m.std)} for m in statistics]}


def _statistics_from_plain(plain: dict):
    if "terms" in plain:
        return [LevelMoments([float(v) for v in t["mean"]], [float(v) for v in t["std"]]) for t in plain["terms"]]
    return MapStatistics([float(v) for v in plain["level_max"]], float(plain["normality_max"]))


def to_plain(calibration: Calibration, identity: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, "identity": dict(identity), "shots": calibration.shots,
            "rule": calibration.rule,
            "maps": {kind: {"statistics": _statistics_to_plain(calibration.statistics[kind]),
                            "reference_scores": calibration.reference_scores[kind],
                            "reference_range": list(calibration.reference_range[kind])}
                     for kind in calibration.statistics}}


def from_plain(plain: dict) -> Calibration:
    maps = plain["maps"]
    return Calibration(int(plain["shots"]), str(plain["rule"]),
                       {kind: _statistics_from_plain(m["statistics"]) for kind, m in maps.items()},
                       {kind: {rule: [float(v) for v in values] for rule, values in m["reference_scores"].items()}
                        for kind, m in maps.items()},
                       {kind: tuple(float(v) for v in m["reference_range"]) for kind, m in maps.items()})


def save(folder: str, calibration: Calibration, identity: dict) -> str:
    """Write the calibration into ``folder`` (atomically); returns its path."""
    path = os.path.join(folder, file_name(identity))
    os.makedirs(folder, exist_ok=True)
    save_json(path, to_plain(calibration, identity))
    return path


def load(folder: str, identity: dict, kinds: Sequence[str]) -> Tuple[Optional[Calibration], str]:
    """(the calibration in ``folder`` made from and for ``identity`` with the maps ``kinds``, "") or
    (None, why there is none to use: absent, unreadable, another version, another identity)."""
    path = os.path.join(folder, file_name(identity))
    if not os.path.isfile(path):
        return None, f"no {file_name(identity)} in {folder}"
    try:
        with open(path) as f:
            plain = json.load(f)
        if plain.get("format") != FORMAT or plain.get("version") != VERSION:
            return None, f"{path} is not a calibration file of version {VERSION}"
        differs = sorted(key for key in set(identity) | set(plain["identity"])
                         if plain["identity"].get(key) != identity.get(key))
        if differs:
            return None, f"{path} was made for another {', '.join(differs)}"
        missing = [kind for kind in kinds if kind not in plain["maps"]]
        if missing:
            return None, f"{path} lacks the map {', '.join(missing)}"
        return from_plain(plain), ""
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{path} cannot be read ({type(err).__name__}: {err})"
