"""Training checkpoints: what they hold, and whether one fits a run or a target.

A checkpoint (``<run>_latest.pth``, ``<run>_best.pth``) holds only tensors and
plain values, so it opens with ``torch.load(weights_only=True)``:

* ``format``: :data:`CHECKPOINT_FORMAT`;
* ``model_config``: the :class:`models.resad.ModelConfig` of the model, field by field;
* ``trained_on``: setting, source dataset, seen classes, backbone, channels, layers;
* ``model``, ``trainer`` (optimizers, schedulers, BG-SPP boundaries), ``generator``,
  ``rng`` (all random states), ``epoch``, ``best``;
* ``args``: the arguments of the run that wrote it, for the record only.

Checkpoints of earlier versions (the model options only in ``args``; backbone,
channels and layers at the top level; NumPy's random state as an array) are
upgraded on load.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from datasets import Setting, get_setting
from models.extractor import FeatureExtractor
from models.resad import ModelConfig
from utils.errors import UserError
from utils.safe_load import load_weights_only, save_weights_only
from utils.seed import numpy_state_to_plain

CHECKPOINT_FORMAT = "resad-checkpoint-2"
READABLE_FORMATS = ("resad-checkpoint-1", CHECKPOINT_FORMAT)
WHAT = "a checkpoint of this project (a <setting>_latest.pth or _best.pth written by main.py)"


def trained_on(setting: Setting, extractor: FeatureExtractor) -> dict:
    """What a model is trained on, as plain values (checked by :func:`check_target`)."""
    return {"setting": setting.name, "source": setting.source, "seen_classes": list(setting.seen_classes),
            "backbone": extractor.name, "channels": [int(c) for c in extractor.channels],
            "layers": [int(i) for i in extractor.layers], "feature_levels": len(extractor.channels)}


def checkpoint_state(model, model_config: ModelConfig, record: dict, arguments: dict, **training) -> dict:
    """The checkpoint of ``model``: its weights and configuration, what it was trained on (``record``,
    from :func:`trained_on`), the run's ``arguments`` and the ``training`` state (trainer, generator,
    rng, epoch, best)."""
    return {"format": CHECKPOINT_FORMAT, "model_config": model_config.to_dict(), "trained_on": dict(record),
            "args": dict(arguments), "model": model.state_dict(), **training}


def save(path: str, state: dict) -> None:
    save_weights_only(path, state)


def load(path: str, flag: str = "--resume") -> dict:
    """Load a checkpoint of this project weights-only and upgrade earlier versions."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: checkpoint not found; give a <setting>_latest.pth written by main.py")
    state = load_weights_only(path, flag, WHAT)
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path}: not a checkpoint of this project; give a <setting>_latest.pth")
    rng = state.get("rng")
    if isinstance(rng, dict) and "numpy" in rng:  # earlier versions stored NumPy's tuple with an array
        state["rng"] = dict(rng, numpy=numpy_state_to_plain(rng["numpy"]))
    return _upgraded(state)


def _upgraded(state: dict) -> dict:
    """Fill ``model_config`` and ``trained_on`` of a checkpoint written before they existed."""
    args = state.get("args") or {}
    if "model_config" not in state and isinstance(args, dict):
        state["model_config"] = ModelConfig.from_dict(args).to_dict()
    if "trained_on" not in state and args.get("setting"):
        source = get_setting(args["setting"])
        channels = list(state.get("channels", []))
        state["trained_on"] = {"setting": args["setting"], "source": source.source,
                               "seen_classes": list(source.seen_classes), "backbone": state.get("backbone"),
                               "channels": channels, "feature_levels": len(channels)}
    if "trained_on" in state and "layers" not in state["trained_on"] and "layers" in state:
        state["trained_on"]["layers"] = list(state["layers"])
    return state


def model_config(state: dict) -> ModelConfig:
    return ModelConfig.from_dict(state.get("model_config", {}))


def backbone_mismatch(record: dict, extractor: FeatureExtractor) -> Optional[str]:
    """How the backbone ``record`` (a ``trained_on`` or a reference ``meta.json``) differs from
    ``extractor``: "backbone", "layers" or "channels", or None when it fits."""
    if record.get("backbone") and record["backbone"] != extractor.name:
        return "backbone"
    if record.get("layers") is not None and list(record["layers"]) != list(extractor.layers):
        return "layers"
    if record.get("channels") and list(record["channels"]) != list(extractor.channels):
        return "channels"
    return None
