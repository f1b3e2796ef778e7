"""Speed of the whole evaluation, per stage, against the frozen backbone alone, on the same images.

    python benchmarks/eval_speed.py                        # offline backbone, synthetic demo images
    python benchmarks/eval_speed.py --compare              # + the previous implementation (per stage), same run,
                                                           #   results compared
    python benchmarks/eval_speed.py --shots 2 4 6 8        # + the sweep's time over a 4-shot-only evaluation
    python benchmarks/eval_speed.py --knn_only             # the kNN baseline alone, over ResAD's evaluation
    python benchmarks/eval_speed.py --compare_presets      # the recommended preset's evaluation over the authors'
    python benchmarks/eval_speed.py --backbone wide_resnet50_2 --random_weights --device cuda --images 1000

The evaluation is the real code path (``utils.run.evaluation.evaluate``): image loading,
feature extraction, matching against a k-shot bank, VQ + EFDM, constraintor,
flows, anomaly maps and all metrics including the exact AUPRO.  The model is
randomly initialised (speed does not depend on training).  The backbone figure
is image loading + the extractor's forward pass over the same loader.
Prints the per-stage table (seconds, multiply-accumulates counted on one batch
and scaled, GMAC/s, share of the machine's dense ``torch.mm`` rate measured in
the same run), images/s of both, their ratio and the peak memory.  ``--knn_only`` times the
training-free baseline alone (``utils.run.knn.knn_metrics``, the path of ``--baseline knn``:
loading, backbone, nearest-neighbour search, maps, metrics) per stage, prints its peak memory
(before anything else runs), then ResAD's evaluation of the same images and the ratio of the two.
``--compare_presets`` times the evaluation of the same images under each preset (its map, image score and
normalisation; per-map metrics off), each after a one-batch warm-up, twice in alternation, and prints
the ratio of the recommended preset's time to the authors'.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks_common import build_benchmark_extractor  # noqa: E402
from datasets import DEMO_UNSEEN, Sample, evaluation_samples, generate_demo_dataset, list_fewshot_images  # noqa: E402
from models.extractor import OFFLINE_BACKBONE  # noqa: E402
from models.matching import ReferenceBank  # noqa: E402
from models.resad import ResAD  # noqa: E402
from stages import StageProfile, load_average, matmul_rate_gmacs, peak_memory_gib  # noqa: E402
from utils.cli.adapters import run_config  # noqa: E402
from utils.cli.options import Parser, add_training_arguments  # noqa: E402
from utils.run.evaluation import evaluate  # noqa: E402
from utils.run.loaders import make_loader  # noqa: E402
from utils.runtime import configure_device, resolve_device, tune_cpu_allocator  # noqa: E402
from utils.seed import seed_everything  # noqa: E402


def parse_args(argv=None):
    parser = Parser(description=__doc__)
    parser.add_argument("--images", type=int, default=240, help="test images (the demo test set, repeated)")
    parser.add_argument("--classes", type=int, default=3, help="unseen classes to spread the images over")
    parser.add_argument("--data", default="./data/demo", help="where the synthetic demo dataset lives")
    parser.add_argument("--shots", type=int, nargs="+", default=None,
                        help="evaluate for these numbers of reference shots at once (e.g. 2 4 6 8) and print the "
                             "time over a --num_ref_shot-only evaluation")
    parser.add_argument("--random_weights", action="store_true",
                        help="build the backbone with random weights (offline timing of any timm CNN)")
    parser.add_argument("--compare", action="store_true",
                        help="also time the previous implementation (benchmarks/legacy.py: matching, VQ, EFDM, "
                             "flow position tables) per stage in the same run and check the metrics are identical")
    parser.add_argument("--knn_only", action="store_true",
                        help="time the kNN baseline alone (the path of --baseline knn), its peak memory, and its "
                             "time over ResAD's evaluation of the same images")
    parser.add_argument("--compare_presets", action="store_true",
                        help="time the evaluation under each preset (per-map metrics off) and print their ratio")
    add_training_arguments(parser)
    parser.set_defaults(backbone=OFFLINE_BACKBONE, num_workers=min(4, os.cpu_count() or 1))
    return parser.parse_args(argv)


def workload(args, extractor, device, shots):
    """The test images (the demo test set, repeated to ``--images``) and a bank of the largest k per class."""
    root = generate_demo_dataset(args.data)
    classes = list(DEMO_UNSEEN[: args.classes])
    per_class = -(-args.images // len(classes))
    test_sets, banks = {}, {}
    bank_shots = max(list(shots) + [args.num_ref_shot])
    for name in classes:
        samples = evaluation_samples("demo", root, name)
        test_sets[name] = (samples * (per_class // len(samples) + 1))[:per_class]
        refs = make_loader([Sample(path, 0, (), name) for path in list_fewshot_images(root, name, bank_shots)],
                           extractor, bank_shots, 0)
        banks[name] = ReferenceBank.from_features(extractor(next(iter(refs))["image"].to(device)))
    return classes, test_sets, banks


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    configure_device(device)
    shots = sorted(set(args.shots)) if args.shots else [args.num_ref_shot]
    extractor = build_benchmark_extractor(args, device)
    classes, test_sets, banks = workload(args, extractor, device, shots)
    n_images = sum(len(v) for v in test_sets.values())
    config = run_config(args, shots, {k: "eval_speed" for k in shots})
    model = ResAD(extractor.channels, config.model, fdm_alpha=config.evaluation.fdm_alpha).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, backbone {extractor.name}{' (random weights)' if args.random_weights else ''}, "
          f"{n_images} test images of {len(classes)} classes, {shots}-shot banks, batch {args.eval_batch_size}, "
          f"{args.num_workers} loader workers, {torch.get_num_threads()} torch threads, load {load_average()}")

    def run(shot_list, sets=test_sets, scorer=model, evaluation=config.evaluation):
        sync()
        start = time.perf_counter()
        results = evaluate(scorer, extractor, sets, banks, replace(evaluation, shots=tuple(shot_list)), device,
                           args.num_workers, args.seed)
        sync()
        return time.perf_counter() - start, results

    one_batch = {classes[0]: test_sets[classes[0]][: args.eval_batch_size]}
    if args.compare_presets:
        compare_presets(run, config, shots, one_batch, n_images)
        return
    if args.knn_only:
        knn_versus_resad(run, extractor, test_sets, banks, config.evaluation, args, device, shots, one_batch)
        return
    # Multiply-accumulates of one batch (also the warm-up), then the timed runs.
    profile = StageProfile(device)
    with profile.listen():
        profile.counting = True
        run(shots, sets=one_batch)
        profile.counting = False
        rate = matmul_rate_gmacs(device)
        total_s, results = run(shots)
    backbone_s = backbone_seconds(extractor, test_sets, args, device, sync)
    scale = n_images / len(one_batch[classes[0]])
    print(profile.table(total_s, rate, scale_macs=scale, title=f"evaluation, {shots} shots"))
    print(f"backbone alone     : {n_images / backbone_s:8.2f} images/s ({backbone_s:.1f} s)")
    print(f"whole evaluation   : {n_images / total_s:8.2f} images/s ({total_s:.1f} s)")
    print(f"ratio eval/backbone: {total_s / backbone_s:8.2f}x")
    if args.shots and shots != [args.num_ref_shot]:
        single_s, _ = run([args.num_ref_shot])
        print(f"shots {shots} at once: {total_s:.1f} s; {args.num_ref_shot}-shot only: {single_s:.1f} s; "
              f"ratio {total_s / single_s:.2f}x")
    if args.compare:
        compare_previous(run, model, profile, rate, scale, shots, classes, device)
    print(f"peak memory (RSS)  : {peak_memory_gib():8.2f} GiB"
          + (f", CUDA {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""))
    print(f"load average after : {load_average()}")


def backbone_seconds(extractor, test_sets, args, device, sync) -> float:
    """Image loading and the extractor's forward pass over the same loaders, alone."""
    sync()
    start = time.perf_counter()
    for samples in test_sets.values():
        for batch in make_loader(samples, extractor, args.eval_batch_size, args.num_workers):
            extractor(batch["image"].to(device))
    sync()
    return time.perf_counter() - start


def knn_versus_resad(run, extractor, test_sets, banks, config, args, device, shots, one_batch) -> None:
    """``--knn_only``: the kNN baseline alone per stage (after a one-batch warm-up) and its peak memory,
    then ResAD's evaluation of the same images (also warmed up) and the ratio of their times."""
    from utils.run.knn import knn_metrics

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_images = sum(len(v) for v in test_sets.values())
    knn_metrics(extractor, one_batch, banks, config, device, args.num_workers)
    profile = StageProfile(device)
    with profile.listen():
        sync()
        start = time.perf_counter()
        knn_metrics(extractor, test_sets, banks, config, device, args.num_workers)
        sync()
        knn_s = time.perf_counter() - start
    knn_peak = peak_memory_gib()
    print(profile.table(knn_s, matmul_rate_gmacs(device), title=f"kNN baseline alone, {shots} shots"))
    print(f"peak memory (RSS) after the kNN baseline: {knn_peak:.2f} GiB; load {load_average()}")
    run(shots, sets=one_batch)
    resad_s, _ = run(shots)
    print(f"kNN baseline alone : {n_images / knn_s:8.2f} images/s ({knn_s:.1f} s)")
    print(f"ResAD evaluation   : {n_images / resad_s:8.2f} images/s ({resad_s:.1f} s)")
    print(f"ratio kNN/ResAD    : {knn_s / resad_s:8.2f}x")
    print(f"peak memory (RSS)  : {peak_memory_gib():8.2f} GiB (both)"
          + (f", CUDA {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""))
    print(f"load average after : {load_average()}")


def compare_presets(run, config, shots, one_batch, n_images) -> None:
    """``--compare_presets``: each preset's evaluation of the same images, per-map metrics off, warmed up
    on one batch and timed twice in alternation (the machine's load drifts); the best time of each."""
    from utils.cli.presets import PRESETS

    settings = {name: replace(config.evaluation, map_metrics=False, **values) for name, values in PRESETS.items()}
    best = {}
    for _ in range(2):
        for name, evaluation in settings.items():
            run(shots, sets=one_batch, evaluation=evaluation)
            seconds, _ = run(shots, evaluation=evaluation)
            best[name] = min(best.get(name, float("inf")), seconds)
    for name, seconds in best.items():
        values = " ".join(f"--{k} {v}" for k, v in PRESETS[name].items()) or "the authors' defaults"
        print(f"preset {name:<12}: {n_images / seconds:8.2f} images/s ({seconds:.1f} s; {values})")
    print(f"ratio recommended/authors: {best['recommended'] / best['authors']:.2f}x; load {load_average()}")


def compare_previous(run, model, profile, rate, scale, shots, classes, device) -> None:
    """The previous implementation (benchmarks/legacy.py) per stage, and whether its metrics are identical."""
    import legacy

    new_s, new_results = run(shots)
    old_profile = StageProfile(device)
    with old_profile.listen():
        old_s, old_results = run(shots, scorer=legacy.legacy_copy(model))
    old_profile.macs.update(profile.macs)
    print(old_profile.table(old_s, rate, scale_macs=scale, title=f"previous implementation, {shots} shots"))
    same = all(np.array_equal(np.asarray(list(new_results[k][c].metrics.values()), dtype=float),
                              np.asarray(list(old_results[k][c].metrics.values()), dtype=float), equal_nan=True)
               for k in shots for c in classes)
    print(f"previous implementation (benchmarks/legacy.py): {old_s:.1f} s, this one {new_s:.1f} s (untimed "
          f"stages) -> {old_s / new_s:.2f}x; metrics {'identical' if same else 'DIFFERENT'}; load {load_average()}")


if __name__ == "__main__":
    from utils.errors import run_cli

    raise SystemExit(run_cli(main))
