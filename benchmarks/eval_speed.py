"""Speed of the whole evaluation against the frozen backbone alone, on the same images.

    python benchmarks/eval_speed.py                        # offline backbone, synthetic demo images
    python benchmarks/eval_speed.py --backbone wide_resnet50_2 --device cuda --images 1000

The evaluation is the real code path (``utils.evaluation.evaluate``): image loading,
feature extraction, matching against a 4-shot bank, VQ + EFDM, constraintor,
flows, anomaly maps and all metrics including the exact AUPRO.  The model is
randomly initialised (speed does not depend on training).  The backbone figure
is image loading + the extractor's forward pass over the same loader.
Prints images/s of both, their ratio, the time spent in metrics and the peak
memory of the process.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils.evaluation as evaluation  # noqa: E402
from datasets import DEMO_UNSEEN, Sample, generate_demo_dataset, list_fewshot_images, test_samples  # noqa: E402
from models.extractor import OFFLINE_BACKBONE, build_extractor  # noqa: E402
from models.residual import ReferenceBank  # noqa: E402
from utils.options import add_training_arguments  # noqa: E402
from utils.engine import build_model  # noqa: E402
from utils.loaders import make_loader  # noqa: E402
from utils.runtime import resolve_device, tune_cpu_allocator  # noqa: E402
from utils.seed import seed_everything  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="test images (the demo test set, repeated)")
    parser.add_argument("--classes", type=int, default=3, help="unseen classes to spread the images over")
    parser.add_argument("--data", default="./data/demo", help="where the synthetic demo dataset lives")
    add_training_arguments(parser)
    parser.set_defaults(backbone=OFFLINE_BACKBONE, num_workers=min(4, os.cpu_count() or 1))
    return parser.parse_args(argv)


def peak_memory_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    root = generate_demo_dataset(args.data)
    extractor = build_extractor(args.backbone, args.backbone_weights, device=device)
    classes = list(DEMO_UNSEEN[: args.classes])
    per_class = -(-args.images // len(classes))
    test_sets, banks = {}, {}
    for name in classes:
        samples = test_samples("demo", root, name)
        test_sets[name] = (samples * (per_class // len(samples) + 1))[:per_class]
        refs = make_loader([Sample(path, 0, (), name) for path in list_fewshot_images(root, name, args.num_ref_shot)],
                                  extractor, args.num_ref_shot, 0)
        banks[name] = ReferenceBank.from_features(extractor(next(iter(refs))["image"].to(device)))
    n_images = sum(len(v) for v in test_sets.values())
    model = build_model(args, extractor.channels).to(device)

    # The backbone alone: the same loaders, extraction only.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    evaluation.evaluate(model, extractor, {classes[0]: test_sets[classes[0]][: args.eval_batch_size]}, banks,
                    [args.num_ref_shot], args, device)  # warm-up
    sync()
    start = time.perf_counter()
    for samples in test_sets.values():
        for batch in make_loader(samples, extractor, args.eval_batch_size, args.num_workers):
            extractor(batch["image"].to(device))
    sync()
    backbone_s = time.perf_counter() - start

    metrics_time = [0.0]
    compute = evaluation.compute_metrics

    def timed_metrics(*a, **k):
        t = time.perf_counter()
        out = compute(*a, **k)
        metrics_time[0] += time.perf_counter() - t
        return out

    evaluation.compute_metrics = timed_metrics
    start = time.perf_counter()
    evaluation.evaluate(model, extractor, test_sets, banks, [args.num_ref_shot], args, device)
    sync()
    total_s = time.perf_counter() - start
    evaluation.compute_metrics = compute

    print(f"device {device}, backbone {extractor.name}, {n_images} test images of {len(classes)} classes, "
          f"{args.num_ref_shot}-shot banks, batch {args.eval_batch_size}, {args.num_workers} loader workers, "
          f"{torch.get_num_threads()} torch threads")
    print(f"backbone alone     : {n_images / backbone_s:8.2f} images/s ({backbone_s:.1f} s)")
    print(f"whole evaluation   : {n_images / total_s:8.2f} images/s ({total_s:.1f} s, "
          f"of which metrics incl. AUPRO {metrics_time[0]:.1f} s)")
    print(f"ratio eval/backbone: {total_s / backbone_s:8.2f}x")
    print(f"peak memory (RSS)  : {peak_memory_gib():8.2f} GiB"
          + (f", CUDA {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    from utils.errors import run_cli

    raise SystemExit(run_cli(main))
