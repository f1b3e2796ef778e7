"""Atomic files and output folders.

Every file is written to a temporary name in its destination folder and then
renamed over the final name, so an interrupted run never leaves a truncated
CSV, JSON, checkpoint or feature file behind; a folder of files (a class of
reference features, a prepared dataset split) is assembled the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import pandas as pd

from utils.errors import UserError


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
        # mkstemp makes the file private (0600); give it the mode a plain open() would (0666 - umask)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds it takes the place of
    ``path`` (a folder already there is moved aside first and deleted after), otherwise it is deleted
    and ``path`` is left as it was."""
    final = os.path.abspath(path)
    parent, name = os.path.dirname(final), os.path.basename(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it private (0700)
        previous = tempfile.mkdtemp(prefix=f".{name}.old.", dir=parent) if os.path.isdir(final) else None
        if previous:
            os.replace(final, os.path.join(previous, name))
        os.replace(staging, final)
        if previous:
            shutil.rmtree(previous)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


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


def save_csv(path: str, frame: pd.DataFrame, float_format: str = "%.5f") -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
