"""Training checkpoints: what they hold, and whether one fits a run or a target.

A checkpoint (``<run>_latest.pth``, ``<run>_best.pth``) holds only tensors and
plain values, so it opens with ``torch.load(weights_only=True)``:

* ``format``: :data:`CHECKPOINT_FORMAT`;
* ``model_config``: the :class:`models.resad.ModelConfig` of the model, field by field;
* ``trained_on``: setting, source dataset, seen classes, backbone, channels, layers and the
  pre-processing ``resize`` (absent from earlier checkpoints: "crop");
* ``model``, ``trainer`` (optimizers, schedulers, BG-SPP boundaries), ``generator``,
  ``rng`` (all random states), ``epoch``, ``best``;
* ``args``: the arguments of the run that wrote it, for the record only.

Checkpoints of earlier versions (the model options only in ``args``; backbone,
channels and layers at the top level; NumPy's random state as an array) are
upgraded on load.
"""
from __future__ import annotations

import os

from datasets import Setting, get_setting
from models.extractor import RECORD_DEFAULTS, BackboneConfig, FeatureExtractor, backbone_mismatch, is_vit
from models.resad import ModelConfig, ResAD
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
            "layers": [int(i) for i in extractor.layers], "feature_levels": len(extractor.channels),
            "resize": extractor.resize}


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


def check_resume(state: dict, path: str, setting: str, extractor: FeatureExtractor, config: ModelConfig) -> None:
    """UserError unless the checkpoint ``state`` continues this run: same setting, backbone and layers,
    and the same model options (every differing option named in one line)."""
    if state.get("format") not in READABLE_FORMATS:
        raise UserError(f"--resume {path}: not a training checkpoint of this project; give a *_latest.pth")
    trained = state.get("trained_on", {})
    if trained.get("setting") != setting:
        raise UserError(f"--resume {path}: the checkpoint is for --setting {trained.get('setting')}, "
                        f"this run is {setting}; pass the matching checkpoint or setting")
    built = {"backbone": extractor.name, "channels": extractor.channels, "layers": extractor.layers}
    differs = backbone_mismatch(trained, built, ("backbone", "channels", "layers"))
    if differs in ("backbone", "channels"):
        raise UserError(f"--resume {path}: the checkpoint was trained with --backbone {trained.get('backbone')}, "
                        f"this run uses {extractor.name}; pass the same --backbone")
    if differs == "layers":
        raise UserError(f"--resume {path}: the checkpoint was trained on the backbone's layers {trained['layers']}, "
                        f"this run uses {extractor.layers}; pass the same --feature_levels / --feature_blocks")
    check_resize(state, path, extractor.resize, "--resume")
    changed = model_config(state).differences(config)
    if changed:
        listed = ", ".join(f"--{name} {saved} (this run {now})" for name, (saved, now) in changed.items())
        raise UserError(f"--resume {path}: the checkpoint has other model options: {listed}; "
                        "use the checkpoint's options")


def check_model(state: dict, path: str, flag: str = "--checkpoint") -> dict:
    """The ``trained_on`` record of a checkpoint that holds a trained model (to evaluate or to predict
    with); UserError unless it is a checkpoint of this project with its model and that record."""
    if state.get("format") not in READABLE_FORMATS or "model" not in state or "trained_on" not in state:
        raise UserError(f"{flag} {path}: not a checkpoint of this project; give a *_latest.pth or *_best.pth")
    return state["trained_on"]


def open_model(path: str, flag: str = "--checkpoint") -> dict:
    """:func:`load` a checkpoint and :func:`check_model` it: the state of a trained model."""
    state = load(path, flag=flag)
    check_model(state, path, flag)
    return state


def check_target(state: dict, path: str, setting: Setting) -> dict:
    """The ``trained_on`` record of a checkpoint to evaluate on ``setting``; UserError unless it was trained
    on the setting's source dataset and seen classes, none of them among the setting's unseen ones."""
    trained = check_model(state, path)
    held = (f"the checkpoint holds a model trained on {trained['source']} ({len(trained['seen_classes'])} seen "
            f"classes, --setting {trained['setting']}, --backbone {trained['backbone']})")
    if trained["source"] != setting.source or sorted(trained["seen_classes"]) != sorted(setting.seen_classes):
        raise UserError(f"--checkpoint {path}: {held}, but --setting {setting.name} is trained on {setting.source} "
                        f"({len(setting.seen_classes)} seen classes); pass a {trained['source']}_to_* setting "
                        f"or a checkpoint trained on {setting.source}")
    overlap = sorted(set(trained["seen_classes"]) & set(setting.unseen_classes)) \
        if trained["source"] == setting.target else []
    if overlap:
        raise UserError(f"--checkpoint {path}: {held}; the classes {', '.join(overlap)} of --setting "
                        f"{setting.name} were seen in training")
    return trained


def check_extractor(state: dict, path: str, extractor: FeatureExtractor) -> None:
    """UserError unless ``extractor`` is the backbone the checkpoint's model was trained on, with its ``resize``."""
    trained = state["trained_on"]
    if backbone_mismatch(trained, {"backbone": extractor.name, "channels": extractor.channels}, ("backbone", "channels")):
        raise UserError(f"--checkpoint {path}: holds a model trained with --backbone {trained['backbone']} "
                        f"(channels {trained['channels']}), this run uses {extractor.name}; pass that --backbone")
    check_resize(state, path, extractor.resize)


def check_resize(state: dict, path: str, resize: str, flag: str = "--checkpoint") -> None:
    """UserError unless the checkpoint's model was trained on images pre-processed with ``resize``
    (``trained_on["resize"]``; "crop" for checkpoints written before it was recorded)."""
    trained = state.get("trained_on", {})
    if backbone_mismatch(trained, {"resize": resize}, ("resize",)):
        made = trained.get("resize", RECORD_DEFAULTS["resize"])
        raise UserError(f"{flag} {path}: the model was trained with --resize {made}, this run uses --resize "
                        f"{resize}; pass --resize {made} (and reference features extracted with it)")


def backbone_of(state: dict):
    """The backbone name and levels (``blocks`` of a ViT, else a number of CNN ``levels``) of a checkpoint."""
    trained = state["trained_on"]
    layers = trained.get("layers")
    if not layers:
        return trained["backbone"], {}
    return trained["backbone"], (dict(blocks=tuple(layers)) if is_vit(trained["backbone"]) else dict(levels=len(layers)))


def backbone_config(state: dict, weights=None, amp: str = "none", resize=None) -> BackboneConfig:
    """The checkpoint's backbone and levels, with a run's local ``weights`` file and ``amp``; ``resize``
    None: the checkpoint's own (:func:`trained_resize`)."""
    name, levels = backbone_of(state)
    return BackboneConfig(name, weights, amp=amp, resize=resize or trained_resize(state), **levels)


def trained_resize(state: dict) -> str:
    """How the checkpoint's training images became the square input (--resize; "crop" before it was recorded)."""
    return state["trained_on"].get("resize", RECORD_DEFAULTS["resize"])


def build_model(state: dict, extractor: FeatureExtractor, fdm_alpha: float, device) -> ResAD:
    """The checkpoint's trained ResAD on ``device``, in evaluation mode, with the inference option
    ``fdm_alpha`` of the run (:func:`check_extractor` first)."""
    model = ResAD(extractor.channels, model_config(state), fdm_alpha=fdm_alpha).to(device)
    model.load_state_dict(state["model"])
    return model.eval()
