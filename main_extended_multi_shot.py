r"""Train ResAD once and evaluate the unseen classes with several numbers of reference shots.

    python main_extended_multi_shot.py --setting mvtec_to_visa --train_dataset_dir /data/mvtec \
        --test_dataset_dir /data/visa --test_ref_feature_dir ./ref_features/w50/visa_8shot \
        --shots 2 4 6 8 --epochs 60 --device cuda:0

    python main_extended_multi_shot.py --demo --shots 1 2 3 4    # offline, synthetic data

Each evaluation extracts the test features once and matches them once against the
largest bank; every k reads its nearest references off that matching (the first
k shots of the bank, SPEC 2.3).  Results go to <checkpoint_path>/<setting>_<k>shot/:
<setting>_<k>shot_epoch<E>_metrics.csv/.json, <setting>_<k>shot_epoch<E>_pixel_auroc.png,
<setting>_<k>shot_latest.pth, <setting>_<k>shot_best.pth and heatmaps/.
"""
from __future__ import annotations

import argparse

from models.extractor import OFFLINE_BACKBONE
from utils.demo import parse_with_demo, prepare_demo
from utils.engine import fit
from utils.errors import UserError, run_cli
from utils.options import add_training_arguments
from utils.runtime import tune_cpu_allocator


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4, 6, 8],
                        help="numbers of reference shots evaluated at every evaluation (replaces --num_ref_shot)")
    add_training_arguments(parser)
    return parse_with_demo(parser, argv, test_ref_feature_dir=f"./ref_features/{OFFLINE_BACKBONE}/demo_multishot")


def main(argv=None) -> None:
    args = parse_args(argv)
    shots = sorted(set(args.shots))
    if shots[0] < 1:
        raise UserError(f"--shots {shots[0]}: must be at least 1")
    tune_cpu_allocator()
    extractor = prepare_demo(args) if args.demo else None
    fit(args, shots=shots, run_names={k: f"{args.setting}_{k}shot" for k in shots}, extractor=extractor)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
