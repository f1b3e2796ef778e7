"""What the training scripts do with their flags, for tests that build the flags themselves; and a script
run in this process, as a subprocess would report it."""
import argparse
import contextlib
import importlib
import io
import os
import subprocess

from utils.cli.adapters import run_config
from utils.errors import run_cli
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


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in this process (the script's ``main`` through :func:`utils.errors.run_cli`):
    its exit status, standard output and standard error, as ``subprocess.run`` gives them, without the
    seconds a new interpreter spends importing torch.  A programming error raises here, which a test
    reports with its traceback; tests that kill or interrupt a run start a real process."""
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(module.main, [str(a) for a in args])
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())
