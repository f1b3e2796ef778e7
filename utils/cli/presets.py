"""Defaults that a flag switches on as a whole: the recipe (``--preset``) and the offline demo (``--demo``).

A preset replaces the parser's defaults; a flag written on the command line still wins.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

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

# --preset: "authors" is the authors' recipe (the parser's own defaults); "recommended" is the best
# recipe measured on real defects (docs/experiments.md).  Each value is a flag's default.
PRESETS: Dict[str, Dict[str, object]] = {
    "authors": {},
    "recommended": dict(anomaly_map="coarse_knn", image_score="mean_top1pct", normalization="references"),
}
DEMO_PRESET = "recommended"


def parse_with_presets(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, demo: bool = True,
                       **demo_overrides) -> argparse.Namespace:
    """Parse ``argv`` with ``--preset`` (default "authors", "recommended" under ``--demo``) and, when
    ``demo``, ``--demo``: their values (and ``demo_overrides``) replace the parser's defaults, and flags
    given on the command line still win."""
    if demo:
        add_demo_argument(parser)
    add_preset_argument(parser)
    args, _ = parser.parse_known_args(argv)
    is_demo = demo and args.demo
    preset = args.preset or (DEMO_PRESET if is_demo else "authors")
    defaults = {**(DEMO_DEFAULTS if is_demo else {}), **(demo_overrides if is_demo else {}), **PRESETS[preset],
                "preset": preset}
    known = {action.dest for action in parser._actions}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    return parser.parse_args(argv)


def preset_line(preset: str, demo: bool = False) -> str:
    """The first line a run prints: its preset and what that preset sets."""
    values = " ".join(f"--{k} {v}" for k, v in PRESETS[preset].items()) or "the authors' defaults"
    return f"{'demo, ' if demo else ''}preset {preset}: {values} (an explicit flag overrides a preset value)"


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="the recipe: authors (default; the authors' numbers) or recommended (the best measured "
                             "on real defects; the --demo default); docs/method.md §2.9")


def add_demo_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", action="store_true",
                        help="generate the synthetic dataset in ./data/demo and run the offline demo "
                             "(other flags still override its defaults)")
