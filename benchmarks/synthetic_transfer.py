r"""Train from normal images alone and transfer: synthetic anomalies on MVTec few-shot -> VisA few-shot.

    python benchmarks/synthetic_transfer.py              # offline backbone, CPU: test set, training, evaluation
    python benchmarks/synthetic_transfer.py --knn_only   # the training-free baseline alone
    python benchmarks/synthetic_transfer.py --checkpoint benchmarks/out/synthetic_transfer/runs/synthetic_transfer/synthetic_transfer_latest.pth

Training: the 8 normal images of each of the 15 MVTec AD classes in
``../shared/data/fewshot/mvtec`` (no test split), stage-2 anomalies drawn on the fly
from the defect families of ``--train_defects``. Test: the 12 VisA classes of
``../shared/data/fewshot/visa`` (unseen), 8 references each; the test images are the
same 8 images, each slightly moved, rotated, rescaled and re-lit (so none equals a
reference), once as it is and once with a synthetic defect of a family that training
did NOT use (``--test_defect``, default ``local_corruption``), written as a ``folder``
dataset. Prints image AUROC, pixel AUROC, pixel AP and AUPRO of ResAD and of the training-free kNN
baseline (raw, ``knn``, and under ResAD's rule, ``knn_normalized``) on the same references and images,
under each ``--normalization`` (the first during training, the others re-scoring the checkpoint), and
the wall time; ``--out FILE`` writes every single map's row as CSV.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd
from PIL import Image
from skimage import transform

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from benchmarks_common import mean_rows  # noqa: E402
from datasets import dataset_classes, list_fewshot_images  # noqa: E402
from datasets.defects import DEFECT_FAMILIES, synthesize_anomaly  # noqa: E402
from datasets.image_io import read_image  # noqa: E402
from models.calibration import NORMALIZATIONS  # noqa: E402
from models.extractor import OFFLINE_BACKBONE, build_extractor  # noqa: E402
from utils.atomic import save_csv  # noqa: E402
from utils.cli.adapters import run_config  # noqa: E402
from utils.cli.options import Parser, add_training_arguments  # noqa: E402
from utils.cli.presets import PRESETS, parse_with_presets, preset_line  # noqa: E402
from utils.formats import checkpoint  # noqa: E402
from utils.formats.run_outputs import RunOutputs  # noqa: E402
from utils.run.eval_run import evaluate_checkpoint  # noqa: E402
from utils.run.extraction import extract_reference_features  # noqa: E402
from utils.run.knn import evaluate_baseline  # noqa: E402
from utils.run.train_run import train  # noqa: E402
from utils.runtime import resolve_device, tune_cpu_allocator  # noqa: E402

SIZE = 224
RUN = "synthetic_transfer"


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__)
    parser.add_argument("--fewshot_dir", default=os.path.join(REPO, "..", "shared", "data", "fewshot"))
    parser.add_argument("--work_dir", default=os.path.join(REPO, "benchmarks", "out", "synthetic_transfer"))
    parser.add_argument("--train_defects", nargs="+", default=["cut_paste", "scar", "perlin_texture"],
                        choices=list(DEFECT_FAMILIES))
    parser.add_argument("--test_defect", default="local_corruption", choices=list(DEFECT_FAMILIES))
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--stage1_epochs", type=int, default=2)
    parser.add_argument("--train_exclude_self", action="store_true",
                        help="a training image is never one of its own references (docs/experiments.md)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=list(PRESETS), default="recommended",
                        help="the recipe of the run (docs/experiments.md)")
    parser.add_argument("--knn_only", action="store_true", help="evaluate only the kNN baseline (no training)")
    parser.add_argument("--normalization", nargs="+", choices=list(NORMALIZATIONS), default=list(NORMALIZATIONS),
                        help="evaluate under each of these normalisations of the maps (the first one during "
                             "training; the others re-score the trained checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="evaluate this trained model instead of training")
    parser.add_argument("--out", default=None, help="also write the table (every map, both normalisations) as CSV")
    return parser.parse_args(argv)


def _load(path: str) -> np.ndarray:
    image = read_image(path)
    scale = SIZE / min(image.size)
    image = image.resize((max(SIZE, round(image.width * scale)), max(SIZE, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
    return np.asarray(image.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32) / 255.0


def _jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A slightly moved, rotated, rescaled and re-lit copy (an unseen view of the same object)."""
    centre = np.array([SIZE / 2, SIZE / 2])
    move = (transform.SimilarityTransform(translation=-centre)
            + transform.SimilarityTransform(scale=rng.uniform(0.96, 1.04), rotation=np.deg2rad(rng.uniform(-4, 4)))
            + transform.SimilarityTransform(translation=centre + rng.uniform(-6, 6, 2)))
    warped = transform.warp(image, move.inverse, mode="edge")
    return np.clip(warped * rng.uniform(0.95, 1.05), 0, 1).astype(np.float32)


def _save(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def build_target(fewshot_root: str, out_root: str, defect: str, seed: int) -> str:
    """The target test set as a ``folder`` dataset: per class a normal and a defective view of each image."""
    marker = os.path.join(out_root, f".complete-{defect}-{seed}")
    if os.path.isfile(marker):
        return out_root
    for class_name in dataset_classes("folder", fewshot_root, "--fewshot_dir"):
        images = [_load(p) for p in list_fewshot_images(fewshot_root, class_name)]
        for i, image in enumerate(images):
            rng = np.random.default_rng([seed, i, len(class_name)])
            _save(_jitter(rng, image), os.path.join(out_root, class_name, "test", "good", f"{i:03d}.png"))
            view = _jitter(rng, image)
            donor = images[(i + 1) % len(images)]
            defective, mask = synthesize_anomaly(rng, view, donor, [defect])
            _save(defective, os.path.join(out_root, class_name, "test", defect, f"{i:03d}.png"))
            _save(mask.astype(np.float32), os.path.join(out_root, class_name, "ground_truth", defect,
                                                        f"{i:03d}_mask.png"))
    open(marker, "w").close()
    return out_root


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    started = time.time()
    source, target_shots = os.path.join(args.fewshot_dir, "mvtec"), os.path.join(args.fewshot_dir, "visa")
    if not os.path.isdir(source) or not os.path.isdir(target_shots):
        raise SystemExit(f"few-shot folders not found under {args.fewshot_dir}; pass --fewshot_dir")
    target = build_target(target_shots, os.path.join(args.work_dir, "visa_test"), args.test_defect, args.seed)
    device = resolve_device(args.device)
    extractor = build_extractor(OFFLINE_BACKBONE, device=device)
    refs = os.path.join(args.work_dir, f"refs_{args.shots}shot")
    extract_reference_features("folder", target_shots, refs, extractor, shots=args.shots)
    trained, tables = args.checkpoint, []
    for normalization in args.normalization:
        config = _config(args, source, target, refs, normalization, trained)
        if args.knn_only:
            evaluate_baseline(config, extractor=extractor)
        elif trained:
            evaluate_checkpoint(config, trained, extractor=extractor)
            evaluate_baseline(config, extractor=extractor)  # the baseline beside it, as a training run does
        else:
            train(config, extractor=extractor)
            trained = RunOutputs(os.path.join(config.checkpoint_path, RUN), RUN).latest_checkpoint()
        epoch = int(checkpoint.load(trained, "--checkpoint").get("epoch", 0)) if trained else 0
        tables.append(mean_rows(config.checkpoint_path, config.run_names, epoch, normalization))
    table = pd.concat(tables, ignore_index=True)
    print(f"\nsynthetic transfer: mvtec few-shot (synthetic {', '.join(args.train_defects)}) -> visa few-shot "
          f"(held-out {args.test_defect}), preset {args.preset}, {args.shots} references, {args.epochs} epochs, "
          f"{OFFLINE_BACKBONE}, {device}")
    shown = table[table["method"].isin(["resad", "knn", "knn_normalized"])]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wall time {time.time() - started:.0f} s (test set, references, training, evaluation)")
    if args.out:
        save_csv(args.out, table, float_format="%.4f")
        print(f"written to {args.out} (every single map)")


def _config(args, source: str, target: str, refs: str, normalization: str, checkpoint_file):
    """The run's configuration under ``normalization`` (``checkpoint_file``: evaluate it; its own folder)."""
    argv = ["--setting", "custom", "--source_dataset", "folder", "--train_dataset_dir", source,
            "--target_dataset", "folder", "--test_dataset_dir", target, "--test_ref_feature_dir", refs,
            "--anomaly_source", "synthetic", "--synthetic_defects", *args.train_defects,
            "--num_ref_shot", str(args.shots), "--backbone", OFFLINE_BACKBONE, "--epochs", str(args.epochs),
            "--stage1_epochs", str(args.stage1_epochs), "--lr", str(args.lr), "--batch_size", "16",
            "--eval_batch_size", "16", "--train_ref_shot", "4", "--train_ref_pool", "8",
            "--eval_freq", str(args.epochs), "--num_workers", "0", "--num_heatmaps", "0", "--device", args.device,
            "--seed", str(args.seed), "--preset", args.preset, "--normalization", normalization,
            "--checkpoint_path", os.path.join(args.work_dir, "runs" if not (checkpoint_file or args.knn_only)
                                              else f"runs_{normalization}")]
    if checkpoint_file:
        argv += ["--eval_only", "--checkpoint", checkpoint_file]
    elif args.train_exclude_self:
        argv += ["--train_exclude_self"]
    train_args = parse_with_presets(add_training_arguments(Parser()), argv, demo=False)
    print(preset_line(train_args.preset))
    return run_config(train_args, [args.shots], {args.shots: RUN})


if __name__ == "__main__":
    main()
