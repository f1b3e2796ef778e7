r"""Train ResAD once and evaluate the unseen classes with several numbers of reference shots.

    python main_extended_multi_shot.py --setting mvtec_to_visa --train_dataset_dir /data/mvtec \
        --test_dataset_dir /data/visa --test_ref_feature_dir ./ref_features/w50/visa_8shot \
        --shots 2 4 6 8 --epochs 60 --device cuda:0

    python main_extended_multi_shot.py --demo --shots 1 2 3 4    # offline, synthetic data

Each evaluation extracts the test features once and matches them once against the
largest bank; every k reads its nearest references off that matching (the first
k shots of the bank, docs/method.md §7.1).  Results go to <checkpoint_path>/<setting>_<k>shot/:
<setting>_<k>shot_epoch<E>_metrics.csv/.json, <setting>_<k>shot_epoch<E>_pixel_auroc.png,
<setting>_<k>shot_latest.pth, <setting>_<k>shot_best.pth and heatmaps/.
"""
from __future__ import annotations

import argparse

from models.extractor import OFFLINE_BACKBONE
from utils.cli.adapters import choose_mode, given_flags, run_config, shot_names
from utils.cli.options import Parser, add_training_arguments
from utils.cli.presets import parse_with_presets, preset_line
from utils.errors import run_cli
from utils.run.demo import prepare_demo
from utils.run.modes import run
from utils.runtime import tune_cpu_allocator

DEMO_REF_DIR = f"./ref_features/{OFFLINE_BACKBONE}/demo_multishot"


def build_parser() -> Parser:
    return add_training_arguments(Parser(description=__doc__), shots_flag="--shots")


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_presets(build_parser(), argv, test_ref_feature_dir=DEMO_REF_DIR)


def main(argv=None) -> None:
    parser = build_parser()
    args = parse_with_presets(parser, argv, test_ref_feature_dir=DEMO_REF_DIR)
    mode = choose_mode(args, given_flags(parser, argv))  # train, evaluate a checkpoint, or the kNN baseline
    print(preset_line(args.preset, args.demo))
    shots = sorted(set(args.shots))
    config = run_config(args, shots, shot_names(args.setting, shots, per_shot=True), shots_flag="--shots")
    tune_cpu_allocator()
    extractor = prepare_demo(config) if args.demo else None
    run(mode, config, checkpoint=args.checkpoint, extractor=extractor)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
