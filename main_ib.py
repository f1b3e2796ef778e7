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
from utils.engine import fit
from utils.errors import run_cli
from utils.options import add_training_arguments
from utils.runtime import tune_cpu_allocator

# What differs from main.py: the backbone (4 levels by default for a ViT) and the flows.
IMAGEBIND_DEFAULTS = dict(
    backbone=IMAGEBIND_BACKBONE, backbone_weights=IMAGEBIND_WEIGHTS, flow_arch="flow_model", coupling_layers=4,
    test_ref_feature_dir="./ref_features/imagebind/mvtec_4shot",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser)
    parser.set_defaults(**IMAGEBIND_DEFAULTS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    fit(args, shots=[args.num_ref_shot], run_names={args.num_ref_shot: args.setting})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
