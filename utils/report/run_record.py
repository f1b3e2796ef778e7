"""The run record ``<run>_run.json``: how a run was made, so that it can be trusted and repeated.

Written atomically at the start of every run, after the inputs were checked and
before training: all arguments, the command line, the project's git commit (and
whether the tree was dirty), Python and package versions, the device, the seed,
the dataset roots with the number of images per class and split actually used,
and the metadata of the reference features.  ``--resume`` appends an entry to
``resumes`` instead of overwriting the record.  ``predict.py`` writes ``predict_run.json``
(:func:`prediction_record`) with the same environment.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Dict, List, Optional, Sequence

import torch

from datasets import Sample
from utils.atomic import save_json
from utils.formats import reference_features

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "FrEIA": "FrEIA", "numpy": "numpy",
            "scikit-learn": "sklearn"}  # distribution -> module
PLAIN = (str, int, float, bool, type(None))


def plain_values(arguments: dict) -> dict:
    """``arguments`` as plain values (anything else, e.g. a Path, as its string)."""
    def plain(value):
        if isinstance(value, PLAIN):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value)
    return {key: plain(value) for key, value in arguments.items()}


def git_state(folder: str = REPO_ROOT) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``folder``."""
    def git(*command: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", "-C", folder, *command], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def package_versions() -> Dict[str, Optional[str]]:
    """Python and package versions; the module's own ``__version__`` first (it names the CUDA build of torch)."""
    versions = {"python": platform.python_version()}
    for name, module in PACKAGES.items():
        try:
            versions[name] = str(getattr(importlib.import_module(module), "__version__", None) or metadata.version(name))
        except (ImportError, metadata.PackageNotFoundError):
            versions[name] = None
    return versions


def device_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine() or device.type
    return {"device": str(device), "name": name, "cpu_threads": torch.get_num_threads()}


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def count_images(samples: Sequence[Sample]) -> Dict[str, Dict[str, int]]:
    """Normal and anomalous images per class."""
    counts: Dict[str, Dict[str, int]] = {}
    for s in samples:
        entry = counts.setdefault(s.class_name, {"normal": 0, "anomalous": 0})
        entry["anomalous" if s.label else "normal"] += 1
    return counts


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _environment(device) -> dict:
    return {"time": _now(), "command": [sys.executable] + sys.argv, "cwd": os.getcwd(), "git": git_state(),
            "versions": package_versions(), "device": device_info(device)}


def describe_run(arguments: dict, seed: int, device, roots: Dict[str, str], ref_dir: str, source: str, target: str,
                 stage_samples: Dict[int, List[Sample]], test_sets: Dict[str, List[Sample]]) -> dict:
    """Everything of a run's record except the number of reference shots (one record per shots).

    ``arguments``: the run's arguments as plain values; ``roots``: the ``train`` and ``test`` dataset roots.
    """
    return {
        "created": _environment(device),
        "args": dict(arguments),
        "seed": seed,
        "datasets": {
            "train": {"dataset": source, "root": os.path.abspath(roots["train"]),
                      "stage1": count_images(stage_samples[1]), "stage2": count_images(stage_samples[2])},
            "test": {"dataset": target, "root": os.path.abspath(roots["test"]),
                     "test": count_images([s for samples in test_sets.values() for s in samples])},
        },
        "reference_features": {"dir": os.path.abspath(ref_dir),
                               "classes": {c: reference_features.read_meta(ref_dir, c) for c in test_sets}},
    }


def prediction_record(arguments: dict, seed: int, device, **parts) -> dict:
    """The record ``predict_run.json`` of ``predict.py``: the environment, the arguments, the seed and
    ``parts`` (the checkpoint, the references, the images, the maps, the threshold, the results)."""
    return {"created": _environment(device), "args": dict(arguments), "seed": seed, **parts}


def write_run_records(paths: Dict[int, str], description: dict,
                      resumed_from: Optional[str] = None, epoch: int = 0) -> None:
    """Write ``<run>_run.json`` for each number of shots; on resume, append an entry to the existing record."""
    def fresh(shots: int) -> dict:
        record = dict(description, num_ref_shot=shots, resumes=[])
        record["reference_features"] = dict(description["reference_features"], shots_used=shots)
        return record

    for shots, path in paths.items():
        if resumed_from is None:
            record = fresh(shots)
        else:
            record = _read(path) or dict(fresh(shots), note="written on resume: the original record was missing")
            changed = {k: [record.get("args", {}).get(k), v] for k, v in description["args"].items()
                       if record.get("args", {}).get(k) != v}
            record.setdefault("resumes", []).append(dict(description["created"], checkpoint=os.path.abspath(resumed_from),
                                                         after_epoch=epoch, changed_args=changed))
        save_json(path, record)


def read_record(path: str) -> dict:
    """A run record, or {} when it is missing or unreadable."""
    return _read(path) or {}


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
