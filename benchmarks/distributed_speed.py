r"""Images per second of training and evaluation with 1 and 2 (or more) ranks under torchrun, same data.

    python benchmarks/distributed_speed.py                       # CPU, gloo: 1 and 2 ranks
    python benchmarks/distributed_speed.py --device cuda --ranks 1 2 --train_images 64   # GPUs, NCCL

Each run is the real command, ``torchrun --standalone --nproc_per_node N main.py ...``, on a generated demo
dataset (``--train_images`` normal images per seen class, 5 seen classes; ``--test_images`` per unseen
class, 3 unseen classes), the offline backbone, 2 epochs (one of stage 1, one of stage 2) and one
evaluation after the second.  The figures come from the run's own history CSV: training images/s of each
epoch (the images the ranks together saw, over the epoch's wall time) and evaluation images/s.  What
does not scale: every rank encodes the training reference pool, and the maps and metrics of a class
are computed on one rank (the per-class statistics need all its images).  On a CPU torchrun gives each
of several ranks one thread, so 2 ranks on 2 cores compare with 1 rank on 2 threads.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import pandas as pd  # noqa: E402

from datasets import DEMO_SEEN, DEMO_UNSEEN, generate_demo_dataset  # noqa: E402
from models.extractor import OFFLINE_BACKBONE, build_extractor  # noqa: E402
from stages import load_average  # noqa: E402
from utils.cli.options import Parser, at_least  # noqa: E402
from utils.run.extraction import extract_reference_features  # noqa: E402


def parse_args(argv=None):
    parser = Parser(description=__doc__)
    parser.add_argument("--ranks", type=at_least(1), nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train_images", type=at_least(4), default=24, help="normal images per seen class")
    parser.add_argument("--test_images", type=at_least(2), default=24, help="test images per unseen class")
    parser.add_argument("--batch_size", type=at_least(1), default=8, help="per rank")
    parser.add_argument("--work_dir", default=None, help="default: a temporary folder")
    return parser.parse_args(argv)


def command(args, root: str, refs: str, out: str, ranks: int):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            os.path.join(REPO, "main.py"), "--setting", "demo", "--train_dataset_dir", root,
            "--test_dataset_dir", root, "--test_ref_feature_dir", refs, "--backbone", OFFLINE_BACKBONE,
            "--num_ref_shot", "4", "--train_ref_shot", "4", "--train_ref_pool", "8", "--epochs", "2",
            "--stage1_epochs", "1", "--eval_freq", "2", "--batch_size", str(args.batch_size),
            "--eval_batch_size", str(args.batch_size), "--lr", "1e-4", "--num_workers", "0", "--num_heatmaps", "0",
            "--no_map_metrics", "--device", args.device, "--checkpoint_path", out, "--preset", "recommended"]


def measure(args, root: str, refs: str, work: str, ranks: int) -> dict:
    out = os.path.join(work, f"ranks{ranks}")
    proc = subprocess.run(command(args, root, refs, out, ranks), cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"torchrun with {ranks} ranks failed:\n{proc.stderr[-3000:]}")
    history = pd.read_csv(os.path.join(out, "demo", "demo_history.csv"))
    step = args.batch_size * ranks   # the images of one step of all ranks (incomplete steps are dropped)
    seen = [len(DEMO_SEEN) * args.train_images, len(DEMO_SEEN) * (args.train_images + args.test_images)]
    per_epoch = [n // step * step for n in seen]   # stage 2 adds the seen classes' test images
    test_images = len(DEMO_UNSEEN) * args.test_images
    return {"ranks": ranks,
            "stage 1 images/s": per_epoch[0] / history["seconds"][0],
            "stage 2 images/s": per_epoch[1] / history["seconds"][1],
            "evaluation images/s": test_images / history["eval_seconds"].dropna().iloc[-1]}


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or scratch
        half = args.test_images // 2
        root = generate_demo_dataset(os.path.join(work, "demo"), n_train=args.train_images, n_test_good=half,
                                     n_test_anomalous=args.test_images - half)
        refs = os.path.join(work, "refs")
        extract_reference_features("demo", root, refs, build_extractor(OFFLINE_BACKBONE), shots=4,
                                   classes=DEMO_UNSEEN)
        print(f"device {args.device}, {len(DEMO_SEEN) * args.train_images} training images, "
              f"{len(DEMO_UNSEEN) * args.test_images} test images, batch {args.batch_size} per rank, "
              f"{os.cpu_count()} CPU cores, load {load_average()}")
        rows = [measure(args, root, refs, work, ranks) for ranks in args.ranks]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"{last['ranks']} ranks over {first['ranks']}: " + ", ".join(
            f"{key.split(' images')[0]} {last[key] / first[key]:.2f}x" for key in first if key != "ranks")
              + f"; load {load_average()}")


if __name__ == "__main__":
    main()
