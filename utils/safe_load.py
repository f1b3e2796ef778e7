"""Opening checkpoint and weights files safely, and writing files that open safely.

Every checkpoint and weights file is opened with ``torch.load(weights_only=True)``:
only tensors and plain values (dicts, lists, tuples, strings, numbers, booleans)
are rebuilt, so a crafted file cannot run code when it is opened.  A refused
file is reported in one line naming the Python objects it would have imported.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
from typing import Dict, List, Sequence

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.errors import UserError

# The only non-plain objects that checkpoints of earlier versions of this project
# hold: the NumPy random state (a uint32 array).  They are rebuilt (nothing else is
# allowed) and converted to plain values on load.
_LEGACY_NUMPY_GLOBALS = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                         "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}


def save_weights_only(path: str, state: dict) -> None:
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


def load_weights_only(path: str, flag: str, what: str):
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
        state = load_weights_only(path, flag, what)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{flag} {path}: holds no state_dict (a dict of named tensors); give {what}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


