"""Seconds per training epoch, per stage, on a real workload (the real code path).

    python benchmarks/train_speed.py                     # 120 real MVTec 8-shot images, Lite0, 2 CPU cores
    python benchmarks/train_speed.py --compare           # + the previous implementation, same seed, losses compared
    python benchmarks/train_speed.py --backbone wide_resnet50_2 --random_weights --device cuda \
        --images 2000 --epochs 3

The workload: the normal training images of ``--data`` (default the 8-shot
MVTec folders, 15 classes x 8 images), batch 32 with ``drop_last`` (3 steps),
``--train_ref_shot`` references per class drawn from a reference pool that is
re-encoded at the start of every epoch, stage 1.  ``--images N`` repeats the
images (or, without the folder, uses N generated demo images).  An epoch is
``TrainReferencePool.refresh`` + ``utils.run.training.train_one_epoch`` exactly as
``main.py`` runs it; the stages are the ones the production code marks.  First an epoch under the multiply-accumulate counter
(also a warm-up), then ``--epochs`` timed epochs.

``--compare`` also runs the previous implementation (``benchmarks/legacy.py``)
from the same seed in the same process and prints the largest relative
difference of the losses: the fast path must give the same losses to 1e-5.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from benchmarks_common import build_benchmark_extractor, training_workload  # noqa: E402
from stages import StageProfile, load_average, matmul_rate_gmacs, peak_memory_gib  # noqa: E402
from models.resad import ResAD  # noqa: E402
from utils.cli.adapters import run_config  # noqa: E402
from utils.cli.options import Parser, add_training_arguments  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.run.loaders import make_loader  # noqa: E402
from utils.run.reference_pool import TrainReferencePool  # noqa: E402
from utils.run.training import Trainer, train_one_epoch  # noqa: E402
from utils.runtime import configure_device, resolve_device, tune_cpu_allocator  # noqa: E402
from utils.seed import seed_everything  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "fewshot", "mvtec")


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__)
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="<data>/<cls>/train/good/* images (default: the 8-shot MVTec folders); "
                             "absent -> generated demo images")
    parser.add_argument("--images", type=int, default=0, help="training images (default: all of --data)")
    parser.add_argument("--random_weights", action="store_true",
                        help="build the backbone with random weights (offline timing of any timm CNN)")
    parser.add_argument("--compare", action="store_true",
                        help="also run the previous implementation from the same seed and compare the losses")
    parser.add_argument("--generated_dir", default="./data/bench_train", help="where generated images go")
    add_training_arguments(parser)
    parser.set_defaults(backbone="tf_efficientnet_lite0", epochs=2, stage1_epochs=100,
                        num_workers=min(2, os.cpu_count() or 1))
    return parser.parse_args(argv)


def run_epochs(args, extractor, samples, normals, device, epochs: int, profile: StageProfile,
               legacy: bool = False):
    """Train ``epochs`` epochs from the seed, the stages timed (or counted) by ``profile``; returns
    (per-epoch seconds, per-step losses, images the pool encoded)."""
    import legacy as old

    seed_everything(args.seed)
    config = run_config(args, [args.num_ref_shot], {args.num_ref_shot: "train_speed"})
    model = ResAD(extractor.channels, config.model, fdm_alpha=config.evaluation.fdm_alpha).to(device)
    model = old.legacy_copy(model) if legacy else model
    trainer = StepRecorder(model, config.training)
    generator = torch.Generator().manual_seed(args.seed)
    pool = (old.LegacyReferencePool if legacy else TrainReferencePool)(
        extractor, normals, args.train_ref_pool, args.eval_batch_size, args.num_workers, device)
    loader = make_loader(samples, extractor, args.batch_size, args.num_workers, shuffle=True, drop_last=True,
                         generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    epoch_seconds, encoded = [], 0
    with profile.listen():
        for epoch in range(epochs):
            sync()
            start = time.perf_counter()
            pool.refresh(generator)
            train_one_epoch(trainer, extractor, loader, pool, False, generator, device, desc=f"epoch {epoch + 1}")
            sync()
            epoch_seconds.append(time.perf_counter() - start)
            encoded += getattr(pool, "encoded_last_refresh", 0)
    return epoch_seconds, trainer.step_losses, encoded


class StepRecorder(Trainer):
    """The production :class:`Trainer`, keeping the losses of every step."""

    def __post_init__(self):
        super().__post_init__()
        self.step_losses = []

    def train_step(self, *args, **kwargs):
        losses = super().train_step(*args, **kwargs)
        self.step_losses.append(losses)
        return losses


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare and args.train_exclude_self:
        raise UserError("--compare --train_exclude_self: the previous implementation (benchmarks/legacy.py) has no "
                        "--train_exclude_self, so the two would not train alike; drop one of the two")
    tune_cpu_allocator()
    device = resolve_device(args.device)
    configure_device(device)
    extractor = build_benchmark_extractor(args, device)
    samples, normals, source = training_workload(args, extractor)
    steps = len(samples) // args.batch_size
    print(f"device {device}, backbone {extractor.name}{' (random weights)' if args.random_weights else ''}, "
          f"{len(samples)} training images of {len(normals)} classes ({source}), batch {args.batch_size} "
          f"({steps} steps), {args.train_ref_shot} reference shots from a pool of {args.train_ref_pool}, "
          f"{args.num_workers} loader workers, {torch.get_num_threads()} torch threads, load {load_average()}")

    profile = StageProfile(device)
    # Multiply-accumulates: counted on one step (one batch, its images as the pool), then scaled.
    profile.counting = True
    first = samples[: args.batch_size]
    first_normals = {}
    for s in first:
        first_normals.setdefault(s.class_name, []).append(s)
    counted_pool = run_epochs(args, extractor, first, first_normals, device, 1, profile)[2]
    profile.counting = False
    rate = matmul_rate_gmacs(device)
    seconds, losses, encoded = run_epochs(args, extractor, samples, normals, device, args.epochs, profile)
    total = sum(seconds)

    def scale(name: str) -> float:
        return encoded / max(counted_pool, 1) if name == "reference pool refresh" else steps * args.epochs

    print(profile.table(total, rate, scale_macs=scale, title=f"training, {args.epochs} epoch(s)"))
    print(f"reference pool: {encoded} images encoded in {args.epochs} epoch(s) (the previous implementation: "
          f"{sum(min(len(v), args.train_ref_pool) for v in normals.values()) * args.epochs})")
    print(f"seconds per epoch  : {_epochs_line(seconds)}")
    print(f"images/s           : {len(samples) * args.epochs / total:.2f}")
    print(f"peak memory (RSS)  : {peak_memory_gib():.2f} GiB"
          + (f", CUDA {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""))
    print(f"load average after : {load_average()}")

    if args.compare:
        # The previous implementation from the same seed, right after the profiled run of this one,
        # with the same stage wrappers (they cost well under 1 %).
        old_profile = StageProfile(device)
        old_seconds, old_losses, _ = run_epochs(args, extractor, samples, normals, device, args.epochs,
                                                old_profile, legacy=True)
        old_profile.macs.update(profile.macs)
        print(old_profile.table(sum(old_seconds), rate, scale_macs=scale,
                                title=f"previous implementation, {args.epochs} epoch(s)"))
        worst = 0.0
        for new, old in zip(losses, old_losses):
            for key in ("vq", "occ", "flow"):
                if new[key] is not None and old[key] is not None:
                    worst = max(worst, abs(new[key] - old[key]) / max(abs(old[key]), 1e-12))
        print(f"previous implementation: {_epochs_line(old_seconds)}")
        print(f"this implementation    : {_epochs_line(seconds)}")
        print(f"speed-up (total)       : {sum(old_seconds) / sum(seconds):.2f}x; load {load_average()}")
        print(f"losses of {len(losses)} steps, largest relative difference: {worst:.2e} "
              f"({'OK' if worst <= 1e-5 and len(losses) == len(old_losses) else 'DIFFERENT'}, tolerance 1e-5)")


def _epochs_line(seconds) -> str:
    line = " ".join(f"{s:.2f}" for s in seconds)
    if len(seconds) > 1:
        line += f" (first {seconds[0]:.2f}, then mean {sum(seconds[1:]) / (len(seconds) - 1):.2f})"
    return line


if __name__ == "__main__":
    from utils.errors import run_cli

    raise SystemExit(run_cli(main))
