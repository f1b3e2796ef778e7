"""The offline demo: synthetic data, the offline backbone, small settings."""
from __future__ import annotations

import argparse
import os

from models.extractor import OFFLINE_BACKBONE, FeatureExtractor, build_extractor_from_args

DEMO_ROOT = "./data/demo"
DEMO_REF_DIR = f"./ref_features/{OFFLINE_BACKBONE}/demo_4shot"

# Defaults of `main.py --demo`; any flag given on the command line wins.
DEMO_DEFAULTS = dict(
    setting="demo", train_dataset_dir=DEMO_ROOT, test_dataset_dir=DEMO_ROOT, test_ref_feature_dir=DEMO_REF_DIR,
    backbone=OFFLINE_BACKBONE, num_ref_shot=4, train_ref_shot=4, train_ref_pool=8,
    epochs=3, stage1_epochs=1, batch_size=16, eval_batch_size=16, lr=1e-4, eval_freq=3, num_workers=0,
    checkpoint_path="./checkpoints", num_heatmaps=3,
)


def prepare_demo(args: argparse.Namespace) -> FeatureExtractor:
    """Generate the synthetic dataset (reused when present) and its reference features;
    returns the extractor, for the run to reuse."""
    from datasets import DEMO_UNSEEN, generate_demo_dataset
    from utils.references import extract_reference_features
    from utils.runtime import resolve_device

    from utils import io

    io.check_writable(args.checkpoint_path)
    io.check_writable(args.test_ref_feature_dir, "--test_ref_feature_dir")
    root = generate_demo_dataset(args.test_dataset_dir)
    print(f"demo dataset: {os.path.abspath(root)}")
    extractor = build_extractor_from_args(args, resolve_device(args.device))
    extract_reference_features("demo", root, args.test_ref_feature_dir, extractor, shots=args.num_ref_shot,
                               classes=DEMO_UNSEEN)
    return extractor
