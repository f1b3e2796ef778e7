"""Defaults that a flag switches on as a whole: the offline demo (``--demo``).

A preset replaces the parser's defaults; a flag written on the command line still wins.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from models.extractor import OFFLINE_BACKBONE

DEMO_ROOT = "./data/demo"
DEMO_REF_DIR = f"./ref_features/{OFFLINE_BACKBONE}/demo_4shot"

# Defaults of `main.py --demo`; any flag given on the command line wins.
DEMO_DEFAULTS = dict(
    setting="demo", train_dataset_dir=DEMO_ROOT, test_dataset_dir=DEMO_ROOT, test_ref_feature_dir=DEMO_REF_DIR,
    backbone=OFFLINE_BACKBONE, num_ref_shot=4, train_ref_shot=4, train_ref_pool=8,
    epochs=3, stage1_epochs=1, batch_size=16, eval_batch_size=16, lr=1e-4, eval_freq=3, num_workers=0,
    checkpoint_path="./checkpoints", num_heatmaps=3,
)


def parse_with_demo(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                    **demo_overrides) -> argparse.Namespace:
    """Parse ``argv``; with ``--demo`` the demo defaults (and ``demo_overrides``) replace the parser's own,
    and flags given on the command line still win."""
    add_demo_argument(parser)
    args, _ = parser.parse_known_args(argv)
    if args.demo:
        known = {action.dest for action in parser._actions}
        parser.set_defaults(**{k: v for k, v in {**DEMO_DEFAULTS, **demo_overrides}.items() if k in known})
    return parser.parse_args(argv)


def add_demo_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", action="store_true",
                        help="generate the synthetic dataset in ./data/demo and run the offline demo "
                             "(other flags still override its defaults)")
