"""From parsed flags to typed configuration, once, at the edge of the library.

:func:`choose_mode` picks the run a command asks for (train, evaluate a
checkpoint, the kNN baseline) and refuses, in one line, any flag given on the
command line that the mode would ignore; :func:`run_config` and
:func:`backbone_config` turn the Namespace into the frozen configuration the
library takes.  These are the only functions that read a Namespace.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import fields
from typing import Dict, Mapping, Optional, Sequence, Set

from datasets import SettingSpec
from models.extractor import BackboneConfig
from models.resad import ModelConfig
from utils.errors import UserError
from utils.report.run_record import plain_values
from utils.run.config import DataConfig, EvalConfig, PredictConfig, RunConfig, TrainConfig
from utils.run.preflight import EVALUATE, KNN, TRAIN

TRAINING_FLAGS = ("train_dataset_dir", "train_ref_shot", "train_ref_pool", "train_exclude_self", "anomaly_source", "synthetic_fraction",
                  "synthetic_defects", "batch_size", "lr", "epochs", "stage1_epochs", "eval_freq", "resume",
                  "best_metric", "max_bad_steps", "tensorboard", "pos_beta", "margin_tau", "bgspp_lambda")
MODEL_FLAGS = tuple(f.name for f in fields(ModelConfig))
# Flags a mode does not use, and why (a flag given for one of them is refused).
UNUSED = {
    EVALUATE: (TRAINING_FLAGS + MODEL_FLAGS + ("backbone", "feature_levels", "feature_blocks"),
               "--eval_only takes the backbone and the model options from --checkpoint and does not train"),
    KNN: (TRAINING_FLAGS + MODEL_FLAGS + ("fdm_alpha", "num_heatmaps", "ref_groups"),
          "--baseline knn evaluates the training-free baseline alone (first k shots, no heat-maps)"),
    TRAIN: ((), ""),
}


def given_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Set[str]:
    """The destinations of the flags written on the command line ``argv`` (abbreviations included)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    quiet._defaults.clear()
    return set(vars(quiet.parse_known_args(argv)[0]))


def choose_mode(args: argparse.Namespace, given: Set[str]) -> str:
    """:data:`TRAIN`, :data:`EVALUATE` (``--eval_only --checkpoint FILE``) or :data:`KNN` (``--baseline knn``);
    UserError for a flag that the chosen mode would ignore."""
    if args.checkpoint and not args.eval_only:
        raise UserError(f"--checkpoint {args.checkpoint}: only used with --eval_only; "
                        "add --eval_only to evaluate it, or use --resume to continue training")
    if args.eval_only and args.baseline:
        raise UserError("--baseline: not with --eval_only; the baseline needs no checkpoint, drop one of the two")
    if args.eval_only and not args.checkpoint:
        raise UserError("--eval_only: give the trained model with --checkpoint FILE (a *_latest.pth or *_best.pth)")
    mode = EVALUATE if args.eval_only else KNN if args.baseline else TRAIN
    unused, why = UNUSED[mode]
    refused = [f"--{name}" for name in sorted(unused) if name in given]
    if refused:
        raise UserError(f"{', '.join(refused)}: not used here: {why}; drop "
                        f"{'it' if len(refused) == 1 else 'them'}")
    return mode


def backbone_config(args: argparse.Namespace) -> BackboneConfig:
    blocks = tuple(args.feature_blocks) if args.feature_blocks is not None else None
    return BackboneConfig(args.backbone, args.backbone_weights, args.feature_levels, blocks, args.amp, args.resize)


def run_config(args: argparse.Namespace, shots: Sequence[int], run_names: Mapping[int, str],
               shots_flag: str = "--num_ref_shot") -> RunConfig:
    """The :class:`RunConfig` of the training scripts' flags (:func:`utils.cli.options.add_training_arguments`)."""
    setting = SettingSpec(args.setting, args.source_dataset, args.target_dataset,
                          tuple(args.seen_classes) if args.seen_classes else None,
                          tuple(args.unseen_classes) if args.unseen_classes else None)
    data = DataConfig(setting, args.train_dataset_dir, args.test_dataset_dir, args.test_ref_feature_dir)
    values = vars(args)
    model = ModelConfig(**{name: values[name] for name in MODEL_FLAGS})
    training = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig) if f.name != "synthetic_defects"},
                           synthetic_defects=tuple(args.synthetic_defects))
    evaluation = EvalConfig(tuple(int(k) for k in shots), shots_flag, args.ref_groups, args.fdm_alpha,
                            args.smooth_sigma, args.eval_batch_size, not args.no_aupro, args.num_heatmaps,
                            args.anomaly_map, args.image_score, not args.no_map_metrics, args.normalization)
    return RunConfig(dict(run_names), data, backbone_config(args), model, training, evaluation, args.checkpoint_path,
                     args.device, args.seed, args.num_workers, plain_values(vars(args)))


def shot_names(setting: str, shots: Sequence[int], per_shot: bool) -> Dict[int, str]:
    """The run name of each k: the setting (one k), or ``<setting>_<k>shot`` (the multi-shot layout)."""
    return {int(k): f"{setting}_{k}shot" if per_shot else setting for k in shots}


def predict_config(args: argparse.Namespace) -> PredictConfig:
    """The :class:`PredictConfig` of predict.py's flags (:func:`utils.cli.options.add_predict_arguments`)."""
    return PredictConfig(
        checkpoint=args.checkpoint, images=tuple(args.images), out=args.out, ref_images=args.ref_images,
        ref_features=args.ref_features, num_ref_shot=args.num_ref_shot, threshold=args.threshold,
        threshold_quantile=args.threshold_quantile, heatmaps=not args.no_heatmaps, save_maps=args.save_maps,
        anomaly_map=args.anomaly_map, image_score=args.image_score, normalization=args.normalization,
        fdm_alpha=args.fdm_alpha,
        smooth_sigma=args.smooth_sigma, batch_size=args.batch_size, backbone_weights=args.backbone_weights,
        amp=args.amp, device=args.device, num_workers=args.num_workers, seed=args.seed,
        arguments=plain_values(vars(args)))
