r"""Real defects of an unseen class: train on MVTec few-shot normals, evaluate on Magnetic Tile Defects.

    python benchmarks/real_transfer.py                      # recommended preset, k = 1, 2, 4, 8
    python benchmarks/real_transfer.py --preset authors --out authors.csv
    python benchmarks/real_transfer.py --checkpoint runs/real_transfer_1shot/real_transfer_1shot_latest.pth

Training: the 8 normal images of each of the 15 MVTec AD classes in ``../shared/data/fewshot/mvtec``
with synthetic stage-2 anomalies (``--anomaly_source synthetic``), ``--epochs`` epochs, the offline
backbone. Test: ``../shared/data/real/mtd`` (class ``magnetic_tile``: 240 normal tiles and 392 with
real defects and pixel masks; no model saw it), with k = 1, 2, 4 and 8 of its 8 references in one
evaluation (prefix matching). Prints, per k, image AUROC, pixel AUROC, pixel AP and AUPRO of ResAD's
result (``resad``), of each single map it can fuse (``fused`` = the authors' map, ``normality``,
``abnormality``, ``standardized``) and of the training-free kNN baseline (``knn``), with the wall time
and peak memory; ``--out FILE`` writes the table as CSV; ``--resize full`` feeds whole tiles (no crop).
``--checkpoint`` evaluates a trained model instead of training one (e.g. another preset's maps on the
same model).
"""
from __future__ import annotations

import os
import resource
import sys
import time

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from benchmarks_common import mean_rows  # noqa: E402
from models.calibration import NORMALIZATIONS  # noqa: E402
from models.extractor import OFFLINE_BACKBONE, build_extractor, set_resize  # noqa: E402
from utils.atomic import save_csv  # noqa: E402
from utils.cli.adapters import run_config, shot_names  # noqa: E402
from utils.cli.options import Parser, add_resize_argument, add_training_arguments  # noqa: E402
from utils.cli.presets import PRESETS, parse_with_presets, preset_line  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.formats import checkpoint  # noqa: E402
from utils.formats.run_outputs import RunOutputs  # noqa: E402
from utils.run.eval_run import evaluate_checkpoint  # noqa: E402
from utils.run.extraction import extract_reference_features  # noqa: E402
from utils.run.knn import evaluate_baseline  # noqa: E402
from utils.run.train_run import train  # noqa: E402
from utils.runtime import resolve_device, tune_cpu_allocator  # noqa: E402

SHARED = os.path.join(REPO, "..", "shared", "data")
RUN = "real_transfer"


def parse_args(argv=None):
    parser = Parser(description=__doc__)
    parser.add_argument("--fewshot_dir", default=os.path.join(SHARED, "fewshot", "mvtec"),
                        help="training classes: <dir>/<class>/train/good")
    parser.add_argument("--target_dir", default=os.path.join(SHARED, "real", "mtd"),
                        help="the real target in the MVTec layout (its train/good holds the references)")
    parser.add_argument("--work_dir", default=os.path.join(REPO, "benchmarks", "out", "real_transfer"))
    parser.add_argument("--preset", choices=list(PRESETS), default="recommended")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--stage1_epochs", type=int, default=10, help="first epochs without stage-2 anomalies")
    parser.add_argument("--train_exclude_self", action="store_true",
                        help="a training image is never one of its own references (docs/experiments.md)")
    parser.add_argument("--checkpoint", default=None, help="evaluate this trained model instead of training")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    add_resize_argument(parser)
    parser.add_argument("--normalization", nargs="+", choices=list(NORMALIZATIONS), default=list(NORMALIZATIONS),
                        help="evaluate under each of these normalisations of the maps (the first one during "
                             "training; the others re-score the trained checkpoint)")
    parser.add_argument("--out", default=None, help="also write the table as CSV to this file")
    return parser.parse_args(argv)


def training_argv(args, refs: str, normalization: str, checkpoint_file=None) -> list:
    """The flags of the run, as a user would type them for main_extended_multi_shot.py (``checkpoint_file``:
    evaluate it instead of training)."""
    argv = ["--setting", "custom", "--source_dataset", "folder", "--train_dataset_dir", args.fewshot_dir,
            "--target_dataset", "folder", "--test_dataset_dir", args.target_dir, "--test_ref_feature_dir", refs,
            "--anomaly_source", "synthetic", "--backbone", OFFLINE_BACKBONE, "--epochs", str(args.epochs),
            "--stage1_epochs", str(args.stage1_epochs),
            "--eval_freq", str(args.epochs), "--num_workers", "0", "--num_heatmaps", "0", "--device", args.device,
            "--seed", str(args.seed), "--checkpoint_path", _tables_dir(args, normalization, checkpoint_file),
            "--preset", args.preset, "--resize", args.resize, "--normalization", normalization,
            "--shots", *map(str, args.shots)]
    if checkpoint_file:
        return argv + ["--eval_only", "--checkpoint", checkpoint_file]
    return argv + (["--train_exclude_self"] if args.train_exclude_self else [])


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    started = time.time()
    device = resolve_device(args.device)
    extractor = set_resize(build_extractor(OFFLINE_BACKBONE, device=device), args.resize)
    refs = os.path.join(args.work_dir, f"refs_{max(args.shots)}shot{_suffix(args)}")
    extract_reference_features("folder", args.target_dir, refs, extractor, shots=max(args.shots))
    trained = args.checkpoint
    tables = []
    for normalization in args.normalization:
        config = _config(args, refs, normalization, trained)
        if trained:
            evaluate_checkpoint(config, trained, extractor=extractor)
            evaluate_baseline(config, extractor=extractor)  # the baseline beside it, as a training run does
        else:
            train(config, extractor=extractor)
            trained = RunOutputs(os.path.join(config.checkpoint_path, f"{RUN}_{args.shots[0]}shot"),
                                 f"{RUN}_{args.shots[0]}shot").latest_checkpoint()
        epoch = int(checkpoint.load(trained, "--checkpoint").get("epoch", 0))
        tables.append(mean_rows(config.checkpoint_path, config.run_names, epoch, normalization))
    table = pd.concat(tables, ignore_index=True)
    wall, peak = time.time() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"\nreal transfer: mvtec few-shot normals (synthetic stage 2, {args.epochs} epochs) -> "
          f"{os.path.basename(os.path.normpath(args.target_dir))}, preset {args.preset}, {OFFLINE_BACKBONE}, {device}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wall time {wall:.0f} s (references, training, evaluation); peak memory {peak:.2f} GiB")
    if args.out:
        save_csv(args.out, table, float_format="%.4f")
        print(f"written to {args.out}")


def _config(args, refs: str, normalization: str, checkpoint_file):
    parser = add_training_arguments(Parser(), shots_flag="--shots")
    train_args = parse_with_presets(parser, training_argv(args, refs, normalization, checkpoint_file), demo=False)
    print(preset_line(train_args.preset))
    return run_config(train_args, args.shots, shot_names(RUN, args.shots, per_shot=True), shots_flag="--shots")


def _tables_dir(args, normalization: str, checkpoint_file) -> str:
    """The training run's folder (``<preset>``), or that of an evaluation (``<preset>_<normalization>``)."""
    base = os.path.join(args.work_dir, args.preset + _suffix(args))
    return base if not checkpoint_file else f"{base}_{normalization}"


def _suffix(args) -> str:
    """What the work folders of a --resize full run are told apart by (crop keeps the plain names)."""
    return "" if args.resize == "crop" else f"_{args.resize}"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
