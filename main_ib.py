r"""ResAD with the vision encoder of ImageBind-Huge: main.py's run and flags, the authors' ImageBind defaults.

    python extract_ref_features.py --backbone imagebind_huge --dataset mvtec \
        --few_shot_dir ./data/4shot/mvtec --save_dir ./ref_features/imagebind/mvtec_4shot
    python main_ib.py --setting visa_to_mvtec --train_dataset_dir /data/visa \
        --test_dataset_dir /data/mvtec --test_ref_feature_dir ./ref_features/imagebind/mvtec_4shot \
        --num_ref_shot 4 --device cuda:0

The weights (https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth, 4.5 GB) are read from
--backbone_weights (default ./pretrained_weights/imagebind/imagebind_huge.pth); nothing is downloaded.
Levels: the patch tokens of blocks 7, 15, 23 and 31 (1280 x 16 x 16 each, CLIP pre-processing).
"""
from __future__ import annotations

import argparse

from models.extractor import IMAGEBIND_BACKBONE
from models.imagebind import IMAGEBIND_WEIGHTS
from utils.cli.adapters import choose_mode, given_flags, run_config, shot_names
from utils.cli.presets import parse_with_presets, preset_line
from utils.cli.options import Parser, add_training_arguments
from utils.errors import run_cli
from utils.run.modes import run
from utils.runtime import tune_cpu_allocator

# What differs from main.py: the backbone (4 levels by default for a ViT) and the flows.
IMAGEBIND_DEFAULTS = dict(
    backbone=IMAGEBIND_BACKBONE, backbone_weights=IMAGEBIND_WEIGHTS, flow_arch="flow_model", coupling_layers=4,
    test_ref_feature_dir="./ref_features/imagebind/mvtec_4shot",
)


def build_parser() -> Parser:
    parser = add_training_arguments(Parser(description=__doc__))
    parser.set_defaults(**IMAGEBIND_DEFAULTS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_presets(build_parser(), argv, demo=False)


def main(argv=None) -> None:
    parser = build_parser()
    args = parse_with_presets(parser, argv, demo=False)
    mode = choose_mode(args, given_flags(parser, argv))  # train, evaluate a checkpoint, or the kNN baseline
    print(preset_line(args.preset))
    config = run_config(args, [args.num_ref_shot], shot_names(args.setting, [args.num_ref_shot], per_shot=False))
    tune_cpu_allocator()
    run(mode, config, checkpoint=args.checkpoint)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
