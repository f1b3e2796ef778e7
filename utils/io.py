"""Result files, checkpoints and reference features, all written atomically.

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
import pickle
import pickletools
import re
import shutil
import tempfile
import warnings
from typing import Dict, Iterator, List, Optional, Sequence

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


def save_csv(path: str, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.5f")


# --------------------------------------------------------------------------- checkpoints and weights
#
# Every checkpoint and weights file is opened with torch.load(weights_only=True):
# only tensors and plain values (dicts, lists, tuples, strings, numbers, booleans)
# are rebuilt, so a crafted file cannot run code when it is opened.

# The only non-plain objects that checkpoints of earlier versions of this project
# hold: the NumPy random state (a uint32 array).  They are rebuilt (nothing else is
# allowed) and converted to plain values on load.
_LEGACY_NUMPY_GLOBALS = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                         "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` atomically; it must hold only tensors and plain values (checked)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:  # a programming error: the file could not be opened weights-only
            raise TypeError(f"checkpoint state for {path} holds objects that are not tensors or plain values: "
                            f"{', '.join(unsafe)}")


def _refused_globals(path: str, err: Exception) -> List[str]:
    """The Python objects (module.name) that made a weights-only load refuse ``path``."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: read them statically; torch's message names the first one
        found = _bare_pickle_globals(path) + re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        return list(dict.fromkeys(found))


def _bare_pickle_globals(path: str) -> List[str]:
    """The module.name of the objects the pickles in a file would import, read without running them."""
    names, strings = [], []
    with open(path, "rb") as f:
        while True:  # a file may hold several pickles (torch's legacy format), then raw data
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":
                        names.append(".".join(strings[-2:]))
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # not (or no longer) a pickle
                return names


def _refusal(flag: str, path: str, names: Sequence[str], what: str) -> UserError:
    names = sorted(set(names), key=lambda n: (n in _LEGACY_NUMPY_GLOBALS, n))  # the dangerous ones first
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return UserError(f"{flag} {path}: refused to open: besides tensors and plain values it holds Python objects "
                     f"({shown}) whose loading could run code; it was not loaded - use {what}")


def _load_weights_only(path: str, flag: str, what: str):
    """``torch.load(path, weights_only=True)``; one-line UserErrors for refused or unreadable files."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it will refuse anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _refused_globals(path, err)
        if names and set(names) <= _LEGACY_NUMPY_GLOBALS:
            try:
                return _load_legacy_numpy(path)
            except pickle.UnpicklingError as again:  # something else behind the NumPy arrays
                names = names + re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(again))
        if names:
            raise _refusal(flag, path, names, what) from None
        raise UserError(f"{flag} {path}: cannot read it (UnpicklingError); the file is damaged or not "
                        f"{what}") from None
    except Exception as err:  # truncated zip, not a torch file, ...
        raise UserError(f"{flag} {path}: cannot read it ({type(err).__name__}); the file is damaged or not "
                        f"{what}") from None


def _load_legacy_numpy(path: str):
    """Load a file whose only non-plain objects are NumPy arrays (earlier checkpoints' random state)."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
               np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str, flag: str = "--resume") -> dict:
    """Load a checkpoint of this project weights-only; earlier checkpoints are converted to plain values."""
    from utils.seed import numpy_state_to_plain

    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: checkpoint not found; give a <setting>_latest.pth written by main.py")
    what = "a checkpoint of this project (a <setting>_latest.pth or _best.pth written by main.py)"
    state = _load_weights_only(path, flag, what)
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path}: not a checkpoint of this project; give a <setting>_latest.pth")
    rng = state.get("rng")
    if isinstance(rng, dict) and "numpy" in rng:  # earlier versions stored NumPy's tuple with an array
        state["rng"] = dict(rng, numpy=numpy_state_to_plain(rng["numpy"]))
    return state


def load_weights(path: str, flag: str = "--backbone_weights") -> Dict[str, torch.Tensor]:
    """A state_dict from a weights file (``.pth``/``.pt``/``.bin`` weights-only, or ``.safetensors``).

    A checkpoint that wraps the weights (``{"state_dict": ...}``, ``{"model": ...}``)
    is unwrapped and a DataParallel ``module.`` prefix removed.
    """
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found; give the path of a saved state_dict")
    what = "a weights file (a state_dict saved with torch.save, or .safetensors)"
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            state = load_file(path, device="cpu")
        except Exception as err:
            raise UserError(f"{flag} {path}: cannot read it ({type(err).__name__}); the file is damaged or not "
                            f"{what}") from None
    else:
        state = _load_weights_only(path, flag, what)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path}: holds no state_dict (a dict of named tensors); give {what}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


# --------------------------------------------------------------------------- reference features

def save_reference_features(save_dir: str, class_name: str, features: Sequence[torch.Tensor],
                            meta: dict) -> str:
    """Write ``<save_dir>/<class>/layer{1..L}.npy`` (float32, (k*H*W, C) image-major) and ``meta.json``.

    ``meta.json`` holds ``meta`` plus the class, the number of shots and the
    SHA-256 of each layer file (checked by :func:`load_reference_bank`).

    ``features`` are per-level (k, C, H, W) maps of the k reference images.  The
    class folder is assembled under a temporary name and renamed into place (:func:`atomic_folder`).
    """
    bank = ReferenceBank.from_features(features)
    ensure_dir(save_dir, "--save_dir")
    final = os.path.join(save_dir, class_name)
    with atomic_folder(final) as staging:
        digests = {}
        for level, rows in enumerate(bank.levels, start=1):
            name = f"layer{level}.npy"
            np.save(os.path.join(staging, name), rows.cpu().numpy().astype(np.float32))
            digests[name] = file_sha256(os.path.join(staging, name))
        with open(os.path.join(staging, REFERENCE_META), "w") as f:
            json.dump(dict(meta, class_name=class_name, num_shots=bank.num_shots, sha256=digests), f, indent=2)
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


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_reference_meta(ref_dir: str, class_name: str, flag: str = "--test_ref_feature_dir") -> dict:
    """The ``meta.json`` of one class of reference features ({} for the authors' files without one)."""
    path = os.path.join(ref_dir, class_name, REFERENCE_META)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag}: cannot read {path} ({type(err).__name__}); "
                        "re-run extract_ref_features.py for this dataset") from None


def load_reference_bank(ref_dir: str, class_name: str, extractor: dict, num_shots: Optional[int],
                        flag: str = "--test_ref_feature_dir", shots_flag: str = "--num_ref_shot") -> ReferenceBank:
    """Load the reference bank of one class and check it against the extractor in use.

    ``extractor`` is :meth:`models.extractor.FeatureExtractor.describe`.  The
    number of shots is derived from the rows of each level and the feature map
    size; ``num_shots`` of them are kept (the first ones), all of them when None.
    """
    check_reference_dirs(ref_dir, [class_name], flag)
    class_dir = os.path.join(ref_dir, class_name)
    meta_path = os.path.join(class_dir, REFERENCE_META)
    meta = read_reference_meta(ref_dir, class_name, flag)
    if meta.get("backbone") and meta["backbone"] != extractor["backbone"]:
        raise UserError(f"{flag} {class_dir}: features were extracted with --backbone {meta['backbone']}, "
                        f"this run uses {extractor['backbone']}; re-extract them or pass the same --backbone")
    if meta.get("layers") is not None and list(meta["layers"]) != list(extractor.get("layers", meta["layers"])):
        raise UserError(f"{flag} {class_dir}: features are of {extractor['backbone']} layers {meta['layers']}, "
                        f"this run uses layers {extractor['layers']}; re-extract them with the same "
                        "--feature_levels / --feature_blocks")
    made, wanted = meta.get("amp", "none"), extractor.get("amp", "none")
    if made != wanted:
        raise UserError(f"{flag} {class_dir}: features were extracted with --amp {made}, this run uses --amp {wanted}; "
                        f"re-extract them with extract_ref_features.py --amp {wanted} or run with --amp {made}")
    levels: List[torch.Tensor] = []
    shots = None
    for level, (channels, (h, w)) in enumerate(zip(extractor["channels"], extractor["feature_sizes"]), start=1):
        path = os.path.join(class_dir, f"layer{level}.npy")
        if not os.path.isfile(path):
            raise UserError(f"{flag}: missing {path}; re-run extract_ref_features.py for this dataset")
        expected = meta.get("sha256", {}).get(os.path.basename(path))
        if expected and file_sha256(path) != expected:
            raise UserError(f"{flag}: {path} was changed or truncated after extraction (its SHA-256 differs "
                            f"from {meta_path}); re-run extract_ref_features.py for this dataset")
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
        keep = shots if num_shots is None else num_shots
        if keep > shots:
            raise UserError(f"{shots_flag} {keep}: {class_dir} holds only {shots} shots; "
                            f"lower {shots_flag} or extract features from more reference images")
        levels.append(torch.from_numpy(np.array(rows[: keep * h * w], dtype=np.float32)))
    return ReferenceBank(levels, keep)


def load_reference_banks(ref_dir: str, class_names: Sequence[str], extractor: dict, num_shots: Optional[int],
                         device: torch.device | str, shots_flag: str = "--num_ref_shot") -> Dict[str, ReferenceBank]:
    """Banks of ``class_names`` with their first ``num_shots`` shots (all when None), checked before any is moved."""
    banks = {c: load_reference_bank(ref_dir, c, extractor, num_shots, shots_flag=shots_flag) for c in class_names}
    return {c: bank.to(device) for c, bank in banks.items()}
