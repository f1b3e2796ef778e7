r"""Train ResAD on the seen classes of a setting and evaluate it on the unseen classes.

    python main.py --setting visa_to_mvtec --train_dataset_dir /data/visa \
        --test_dataset_dir /data/mvtec --test_ref_feature_dir ./ref_features/w50/mvtec_4shot \
        --num_ref_shot 4 --device cuda:0

    python main.py --demo     # offline: synthetic data, EfficientNet-Lite0, a few minutes on a CPU

    # no training: evaluate a trained model on another target (same source dataset)
    python main.py --eval_only --checkpoint ./checkpoints/mvtec_to_visa/mvtec_to_visa_latest.pth \
        --setting mvtec_to_btad --test_dataset_dir /data/btad --test_ref_feature_dir ./ref_features/w50/btad_4shot

Results go to <checkpoint_path>/<setting>/: <setting>_epoch<E>_metrics.csv/.json,
<setting>_epoch<E>_pixel_auroc.png, <setting>_latest.pth, <setting>_best.pth, heatmaps/,
<setting>_run.json (how the run was made) and <setting>_history.csv/.png (training curves).
"""
from __future__ import annotations

import argparse

from utils.cli.adapters import choose_mode, given_flags, run_config, shot_names
from utils.cli.options import Parser, add_training_arguments
from utils.cli.presets import parse_with_presets, preset_line
from utils.errors import run_cli
from utils.run.demo import prepare_demo
from utils.run.modes import run
from utils.runtime import tune_cpu_allocator


def build_parser() -> Parser:
    return add_training_arguments(Parser(description=__doc__))


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_presets(build_parser(), argv)


def main(argv=None) -> None:
    parser = build_parser()
    args = parse_with_presets(parser, argv)
    mode = choose_mode(args, given_flags(parser, argv))  # train, evaluate a checkpoint, or the kNN baseline
    print(preset_line(args.preset, args.demo))
    config = run_config(args, [args.num_ref_shot], shot_names(args.setting, [args.num_ref_shot], per_shot=False))
    tune_cpu_allocator()
    extractor = prepare_demo(config) if args.demo else None
    run(mode, config, checkpoint=args.checkpoint, extractor=extractor)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
