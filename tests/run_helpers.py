"""What the training scripts do with their flags, for tests that build the flags themselves."""
import argparse

from utils.cli.adapters import run_config
from utils.cli.options import Parser, add_training_arguments
from utils.run.modes import run
from utils.run.preflight import EVALUATE, KNN, TRAIN


def make_args(**overrides) -> argparse.Namespace:
    """main.py's flags at their defaults, with ``overrides``."""
    args = add_training_arguments(Parser()).parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def fit(args: argparse.Namespace, shots, run_names, extractor=None):
    """The run a training script makes of ``args``: its mode, its configuration, the run."""
    mode = EVALUATE if args.eval_only else KNN if args.baseline else TRAIN
    config = run_config(args, shots, run_names, "--shots" if hasattr(args, "shots") else "--num_ref_shot")
    return run(mode, config, checkpoint=args.checkpoint, extractor=extractor)
