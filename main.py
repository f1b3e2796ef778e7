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

from utils.demo import parse_with_demo, prepare_demo
from utils.engine import fit
from utils.errors import run_cli
from utils.runtime import tune_cpu_allocator
from utils.options import add_training_arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parse_with_demo(add_training_arguments(parser), argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    extractor = prepare_demo(args) if args.demo else None
    fit(args, shots=[args.num_ref_shot], run_names={args.num_ref_shot: args.setting}, extractor=extractor)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
