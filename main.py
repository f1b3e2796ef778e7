r"""Train ResAD on the seen classes of a setting and evaluate it on the unseen classes.

    python main.py --setting visa_to_mvtec --train_dataset_dir /data/visa \
        --test_dataset_dir /data/mvtec --test_ref_feature_dir ./ref_features/w50/mvtec_4shot \
        --num_ref_shot 4 --device cuda:0

    python main.py --demo     # offline: synthetic data, EfficientNet-Lite0, a few minutes on a CPU

Results go to <checkpoint_path>/<setting>/: <setting>_epoch<E>_metrics.csv/.json,
<setting>_epoch<E>_pixel_auroc.png, <setting>_latest.pth, <setting>_best.pth, heatmaps/,
<setting>_run.json (how the run was made) and <setting>_history.csv/.png (training curves).
"""
from __future__ import annotations

import argparse

from utils.demo import DEMO_DEFAULTS, prepare_demo
from utils.engine import fit
from utils.errors import run_cli
from utils.runtime import tune_cpu_allocator
from utils.options import add_training_arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help="generate the synthetic dataset in ./data/demo and run the offline demo "
                             "(other flags still override its defaults)")
    add_training_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_DEFAULTS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    extractor = prepare_demo(args) if args.demo else None
    fit(args, shots=[args.num_ref_shot], run_names={args.num_ref_shot: args.setting}, extractor=extractor)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
