"""Command-line flags of the scripts (the authors' flags and defaults), checked at parse time.

Range checks live in the flag types (:func:`at_least`, ...), so a bad value is
refused by the parser, which names the flag: :class:`Parser` turns every parse
error into one ``UserError`` line (``--epochs 0: must be at least 1``).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Callable

from datasets.anomaly_source import ANOMALY_SOURCES
from datasets.defects import DEFECT_FAMILIES
from datasets.resize import DEFAULT_RESIZE, RESIZE_MODES
from models.anomaly_map import ANOMALY_MAP_RECIPES, IMAGE_SCORES
from models.calibration import NORMALIZATIONS
from models.extractor import DEFAULT_BACKBONE, IMAGEBIND_BACKBONE
from models.flow import FLOW_ARCHS
from models.imagebind import IMAGEBIND_WEIGHTS
from models.knn_baseline import BASELINES
from models.residual import RESIDUAL_MODES
from utils.errors import UserError
from utils.metrics import METRIC_NAMES


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line :class:`UserError` s naming the flag and its value."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # "argument --epochs: 0: must be at least 1" -> "--epochs 0: must be at least 1"
        match = re.match(r"argument (\S+?)(?:/\S+)?: (.*)$", message)
        raise UserError(f"{match.group(1)} {match.group(2)}" if match else message)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a whole number") from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An int flag type that refuses values below ``minimum``."""
    def parse(text: str) -> int:
        value = _whole_number(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


def multiple_of_4(text: str) -> int:
    """A positive multiple of 4 (the positional encoding's dimension)."""
    value = _whole_number(text)
    if value < 4 or value % 4:
        raise argparse.ArgumentTypeError(f"{value}: must be a positive multiple of 4")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: must lie in [0, 1]")
    return value


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def add_backbone_arguments(group) -> None:
    """--backbone, --backbone_weights, --feature_levels, --feature_blocks (training and extraction scripts)."""
    group.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help=f"any timm CNN (features_only), any timm ViT, or {IMAGEBIND_BACKBONE}")
    group.add_argument("--backbone_weights", default=None,
                       help="local weights file for the backbone (a timm state_dict, or the ImageBind checkpoint; "
                            f"default for {IMAGEBIND_BACKBONE}: {IMAGEBIND_WEIGHTS})")
    group.add_argument("--feature_levels", type=at_least(1), default=None,
                       help="feature levels: CNN pyramid stages 1..N (default 3), or N evenly spaced ViT blocks "
                            "(default 4: blocks 7 15 23 31 of a 32-block ViT)")
    group.add_argument("--feature_blocks", type=int, nargs="+", default=None, metavar="BLOCK",
                       help="ViT only: the 0-based blocks whose patch tokens are the levels, e.g. 2 5 8 11")


def add_amp_argument(group) -> None:
    """--amp (training, evaluation and reference extraction must agree: it is recorded with the features)."""
    group.add_argument("--amp", default="none", choices=["none", "bf16"],
                       help="bf16: run the frozen backbone under bfloat16 autocast (faster on GPUs; features are "
                            "returned in float32; the rest stays float32). Extract the reference features with the "
                            "same --amp as the run that uses them")


def add_resize_argument(group) -> None:
    """--resize (every script that reads images; recorded with the reference features and in checkpoints)."""
    group.add_argument("--resize", default=DEFAULT_RESIZE, choices=list(RESIZE_MODES),
                       help="crop (authors): resize the short side, then crop the center square, which cuts off "
                            "the borders of non-square images; full: resize the whole image (and mask) to the "
                            "square input. Extract the reference features with the same --resize as the run")


def add_training_arguments(parser: argparse.ArgumentParser, shots_flag: str = "--num_ref_shot") -> argparse.ArgumentParser:
    """Every flag of the training scripts; ``shots_flag`` "--shots" (the multi-shot script) replaces
    --num_ref_shot by --shots (several numbers of reference shots)."""
    _add_data_arguments(parser.add_argument_group("data"), shots_flag)
    _add_run_arguments(parser.add_argument_group("run"))
    _add_mode_arguments(parser.add_argument_group("mode"))
    model = parser.add_argument_group("model")
    add_backbone_arguments(model)
    _add_model_arguments(model)
    return parser


def _add_data_arguments(data, shots_flag: str) -> None:
    data.add_argument("--setting", default="visa_to_mvtec",
                      help="seen -> unseen setting, e.g. mvtec_to_visa, demo, or custom (see --source_dataset)")
    data.add_argument("--train_dataset_dir", default="", help="root of the SOURCE (seen) dataset")
    data.add_argument("--test_dataset_dir", default="", help="root of the TARGET (unseen) dataset")
    data.add_argument("--test_ref_feature_dir", default="./ref_features/w50/mvtec_4shot",
                      help="reference features of the unseen classes (extract_ref_features.py)")
    if shots_flag == "--shots":
        data.add_argument("--shots", type=at_least(1), nargs="+", default=[2, 4, 6, 8],
                          help="numbers of reference shots per unseen class evaluated at every evaluation")
    else:
        data.add_argument("--num_ref_shot", type=at_least(1), default=4,
                          help="reference shots per unseen class at test time")
    data.add_argument("--train_ref_shot", type=at_least(1), default=4, help="reference shots per seen class in a batch")
    data.add_argument("--train_ref_pool", type=at_least(1), default=16,
                      help="normal training images per seen class encoded each epoch to draw references from")
    data.add_argument("--train_exclude_self", action="store_true",
                      help="never draw a training image (or the normal image a synthetic anomaly was drawn on) "
                           "as one of its own references, as at test time; matters when a seen class has few "
                           "normal images (docs/experiments.md)")
    data.add_argument("--source_dataset", default=None,
                      help="with --setting custom: the training dataset (a name above, or folder)")
    data.add_argument("--target_dataset", default=None,
                      help="with --setting custom: the test dataset (a name above, or folder)")
    data.add_argument("--seen_classes", nargs="+", default=None,
                      help="with --setting custom: training classes (default: all of the source)")
    data.add_argument("--unseen_classes", nargs="+", default=None,
                      help="with --setting custom: test classes (default: all of the target)")
    data.add_argument("--anomaly_source", default=None, choices=ANOMALY_SOURCES,
                      help="stage-2 anomalies: real (the source's anomalous test images), synthetic "
                           "(drawn on normal training images) or mixed; default real when the source has them")
    data.add_argument("--synthetic_fraction", type=fraction, default=0.5,
                      help="share of the normal stage-2 images turned into synthetic anomalies")
    data.add_argument("--synthetic_defects", nargs="+", default=list(DEFECT_FAMILIES), choices=list(DEFECT_FAMILIES),
                      help="synthetic defect families to draw")
    data.add_argument("--num_workers", type=at_least(0), default=default_workers(), help="data-loading processes")
    add_resize_argument(data)


def _add_run_arguments(run) -> None:
    run.add_argument("--batch_size", type=at_least(1), default=32)
    run.add_argument("--eval_batch_size", type=at_least(1), default=32)
    run.add_argument("--lr", type=float, default=1e-5)
    run.add_argument("--epochs", type=at_least(1), default=100)
    run.add_argument("--stage1_epochs", type=at_least(0), default=10, help="first epochs on normal images only")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add_amp_argument(run)
    run.add_argument("--checkpoint_path", default="./checkpoints/", help="folder of checkpoints and results")
    run.add_argument("--eval_freq", type=at_least(1), default=1, help="evaluate every N epochs (and after the last)")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--resume", nargs="?", const="auto", default=None,
                     help="continue from a checkpoint (default: <checkpoint_path>/<run>/<run>_latest.pth)")
    run.add_argument("--best_metric", default="Image AUC", choices=METRIC_NAMES,
                     help="metric that selects <run>_best.pth (the reported result is always the last epoch)")
    run.add_argument("--max_bad_steps", type=at_least(1), default=50,
                     help="stop after this many consecutive non-finite losses")
    run.add_argument("--num_heatmaps", type=at_least(0), default=4,
                     help="heat-map images per class after the last epoch")
    run.add_argument("--no_aupro", action="store_true", help="skip AUPRO (it is exact and fast; on by default)")
    run.add_argument("--no_map_metrics", action="store_true",
                     help="skip <run>_epoch<E>_maps.csv (the metrics of each single map; docs/outputs.md)")
    run.add_argument("--ref_groups", type=at_least(1), default=1,
                     help="evaluate each k with N seeded draws of k references out of the bank "
                          "(mean and '<metric> std' columns when N > 1)")
    run.add_argument("--tensorboard", default=None, metavar="DIR",
                     help="also write the training curves to DIR/<run> for TensorBoard (needs the tensorboard package)")


def _add_mode_arguments(mode) -> None:
    mode.add_argument("--eval_only", action="store_true",
                      help="no training: evaluate the model of --checkpoint on the setting's unseen classes")
    mode.add_argument("--checkpoint", default=None,
                      help="with --eval_only: a *_latest.pth or *_best.pth written by a training run")
    mode.add_argument("--baseline", default=None, choices=BASELINES,
                      help="evaluate only this training-free baseline on the unseen classes (no training)")


def _add_model_arguments(model) -> None:
    model.add_argument("--flow_arch", default="conditional_flow_model", choices=FLOW_ARCHS)
    model.add_argument("--coupling_layers", type=at_least(1), default=10)
    model.add_argument("--clamp_alpha", type=float, default=1.9)
    model.add_argument("--pos_embed_dim", type=multiple_of_4, default=256)
    model.add_argument("--pos_beta", type=float, default=0.05, help="normal-boundary quantile of BG-SPP")
    model.add_argument("--margin_tau", type=float, default=0.1, help="margin between the BG-SPP boundaries")
    model.add_argument("--bgspp_lambda", type=float, default=1.0)
    model.add_argument("--fdm_alpha", type=float, default=0.4, help="EFDM strength (1 = no matching)")
    model.add_argument("--num_embeddings", type=at_least(1), default=1536, help="VQ codebook entries per level")
    model.add_argument("--residual", default="squared", choices=RESIDUAL_MODES,
                       help="squared (authors' code) or difference (paper) residuals")
    model.add_argument("--smooth_sigma", type=float, default=4.0, help="Gaussian smoothing of the maps")
    model.add_argument("--anomaly_map", default="authors", choices=list(ANOMALY_MAP_RECIPES),
                       help="authors: the fused normality + abnormality map; standardized: -logp and |e| per "
                            "level, each standardized over the class's positions, summed; standardized_residual: "
                            "also the distance to the matched reference; coarse_residual: -logp and that distance, "
                            "without the finest level; coarse_knn: -logp and the distance to the nearest "
                            "reference (the kNN score), without the finest level (docs/method.md "
                            "§2.9)")
    model.add_argument("--image_score", default="max", choices=IMAGE_SCORES,
                       help="image score from the map: its maximum (authors) or the mean of its top 1 %% pixels")
    add_normalization_argument(model, default="set")


def add_normalization_argument(group, default: str) -> None:
    """--normalization (evaluation, the benchmarks and predict.py)."""
    group.add_argument("--normalization", default=default, choices=NORMALIZATIONS,
                       help="where the maps' statistics (map 1's maxima, the standardized maps' means and "
                            "deviations, the reference threshold) come from: set = the images scored together "
                            "(a class's test split; the authors' protocol: a score depends on the other images) "
                            "or references = the class's k references alone (a score depends only on the image, "
                            f"the model and the references; docs/method.md §2.10). Default {default}")


def real_number(text: str) -> float:
    """A finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return value


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of predict.py."""
    data = parser.add_argument_group("inputs and outputs")
    data.add_argument("--checkpoint", required=True, help="a *_latest.pth or *_best.pth written by a training run")
    refs = data.add_mutually_exclusive_group(required=True)
    refs.add_argument("--ref_images", metavar="DIR", help="a folder of k normal images of the class (encoded now)")
    refs.add_argument("--ref_features", metavar="DIR",
                      help="reference features of the class written by extract_ref_features.py (<save_dir>/<class>)")
    data.add_argument("--num_ref_shot", type=at_least(1), default=None, help="use the first k references (default: all)")
    data.add_argument("--images", nargs="+", required=True, metavar="PATH",
                      help="folders (searched recursively) and image files to score, or - to read image paths "
                           "from standard input, one per line, each scored as it arrives")
    data.add_argument("--out", required=True, help="output folder: scores.csv, heatmaps/, maps/, predict_run.json")
    judged = parser.add_argument_group("threshold")
    exclusive = judged.add_mutually_exclusive_group()
    exclusive.add_argument("--threshold", type=real_number, default=None,
                           help="a fixed image threshold (default: from the references, docs/predict.md)")
    exclusive.add_argument("--threshold_quantile", type=fraction, default=None, metavar="Q",
                           help="the threshold is this quantile of the references' leave-one-out scores "
                                "(default: their maximum)")
    written = parser.add_argument_group("maps and heat-maps")
    written.add_argument("--no_heatmaps", action="store_true", help="no PNG per image (drawing is the slowest part)")
    written.add_argument("--save_maps", action="store_true", help="also one .npy anomaly map per image (float16)")
    written.add_argument("--anomaly_map", default="authors", choices=list(ANOMALY_MAP_RECIPES),
                         help="the map, as main.py --anomaly_map")
    written.add_argument("--image_score", default="max", choices=IMAGE_SCORES, help="as main.py --image_score")
    add_normalization_argument(written, default="references")
    written.add_argument("--fdm_alpha", type=float, default=0.4, help="EFDM strength (1 = no matching)")
    written.add_argument("--smooth_sigma", type=float, default=4.0, help="Gaussian smoothing of the maps")
    run = parser.add_argument_group("run")
    run.add_argument("--backbone_weights", default=None, help="local weights file of the checkpoint's backbone")
    add_amp_argument(run)
    run.add_argument("--batch_size", type=at_least(1), default=32)
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    run.add_argument("--num_workers", type=at_least(0), default=default_workers(), help="image-loading processes")
    run.add_argument("--seed", type=int, default=42)
    return parser
