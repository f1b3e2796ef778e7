"""Images per second of predict.py, of one image at a time, and of the evaluation, on the same images and references.

    python benchmarks/predict_speed.py                     # 100 demo test images of one class, 4 references
    python benchmarks/predict_speed.py --images 2000 --runs predict_no_heatmaps   # memory with many images

Each run is the real code path: :func:`utils.run.predict_run.predict` (one run over all the images:
with its heat-maps, with ``--no_heatmaps``, and ``--no_heatmaps --normalization set``, the three passes),
``stream`` (:class:`utils.run.predictor.Inferencer`, loaded once, then each image scored alone as a line
that sees one part at a time would: read, pre-processed, scored; the loading is not timed) and
:func:`utils.run.evaluation.evaluate` (all metrics with the exact AUPRO and the single maps, no
heat-maps), the offline backbone built once for all of them.  The model is randomly
initialised with the default options (speed does not depend on training) and saved as a checkpoint
in a temporary folder, where predict also writes.  The images are the test images of one demo class,
repeated (as symbolic links) to ``--images``.  Prints images/s of each run, the ratios, and the peak
resident memory of the process after each run (monotonic: run one kind alone to see its own peak).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from stages import load_average, peak_memory_gib  # noqa: E402
from datasets import DEMO_UNSEEN, Sample, evaluation_samples, generate_demo_dataset, get_setting  # noqa: E402
from models.extractor import OFFLINE_BACKBONE, build_extractor  # noqa: E402
from models.resad import ModelConfig, ResAD  # noqa: E402
from utils.cli.options import Parser, at_least  # noqa: E402
from utils.formats import checkpoint  # noqa: E402
from utils.run.config import EvalConfig, PredictConfig  # noqa: E402
from utils.run.evaluation import evaluate  # noqa: E402
from utils.run.predict_run import predict  # noqa: E402
from utils.run.predictor import Inferencer, encode_references  # noqa: E402
from utils.runtime import resolve_device, tune_cpu_allocator  # noqa: E402
from utils.seed import seed_everything  # noqa: E402

RUNS = ("predict", "predict_no_heatmaps", "predict_set", "stream", "evaluation")


def parse_args(argv=None):
    parser = Parser(description=__doc__)
    parser.add_argument("--images", type=at_least(1), default=100, help="test images (one class's, repeated)")
    parser.add_argument("--class_name", default=DEMO_UNSEEN[-1], choices=list(DEMO_UNSEEN))
    parser.add_argument("--num_ref_shot", type=at_least(2), default=4)
    parser.add_argument("--batch_size", type=at_least(1), default=32)
    parser.add_argument("--num_workers", type=at_least(0), default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default="./data/demo", help="where the synthetic demo dataset lives")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs, in this order")
    return parser.parse_args(argv)


def workload(args, folder: str):
    """The class's test samples repeated to ``--images`` as links in ``folder``, and its reference images."""
    root = generate_demo_dataset(args.data)
    originals = evaluation_samples("demo", root, args.class_name)
    samples = []
    for i in range(args.images):
        source = originals[i % len(originals)]
        link = os.path.join(folder, f"{i:05d}_{os.path.basename(source.image)}")
        os.symlink(os.path.abspath(source.image), link)
        samples.append(Sample(link, source.label, source.masks, source.class_name))
    references = os.path.join(root, args.class_name, "train", "good")
    return samples, sorted(os.path.join(references, f) for f in os.listdir(references))[: args.num_ref_shot]


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    seed_everything(0)
    device = resolve_device(args.device)
    extractor = build_extractor(OFFLINE_BACKBONE, device=device)
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "images"))
        samples, ref_files = workload(args, os.path.join(work, "images"))
        model = ResAD(extractor.channels, ModelConfig())
        path = os.path.join(work, "random.pth")
        checkpoint.save(path, checkpoint.checkpoint_state(
            model, ModelConfig(), checkpoint.trained_on(get_setting("demo"), extractor), {}, epoch=0))
        refs = os.path.join(work, "refs")
        os.makedirs(refs)
        for f in ref_files:
            os.symlink(os.path.abspath(f), os.path.join(refs, os.path.basename(f)))
        print(f"device {device}, backbone {extractor.name}, {len(samples)} test images of '{args.class_name}', "
              f"{len(ref_files)} references, batch {args.batch_size}, {args.num_workers} loader workers, "
              f"{torch.get_num_threads()} torch threads, load {load_average()}")
        seconds = {}
        for run in args.runs:
            started = time.perf_counter()
            if run == "evaluation":
                evaluate_once(path, extractor, samples, ref_files, args, device)
            elif run == "stream":
                started = score_one_by_one(path, refs, samples, extractor, device)
            else:
                predict(PredictConfig(checkpoint=path, images=(os.path.join(work, "images"),),
                                      out=os.path.join(work, run), ref_images=refs, batch_size=args.batch_size,
                                      heatmaps=run == "predict", device=str(device), num_workers=args.num_workers,
                                      normalization="set" if run == "predict_set" else "references"),
                        extractor=extractor)
            seconds[run] = time.perf_counter() - started
            print(f"{run:20s}: {len(samples) / seconds[run]:7.2f} images/s ({seconds[run]:.1f} s), "
                  f"peak memory so far {peak_memory_gib():.2f} GiB, load {load_average()}")
    if "evaluation" in seconds:
        for run in (r for r in seconds if r != "evaluation"):
            print(f"{run} takes {seconds[run] / seconds['evaluation']:.2f}x the evaluation's time")
    if "stream" in seconds and "predict_no_heatmaps" in seconds:
        print(f"one image at a time: {seconds['predict_no_heatmaps'] / seconds['stream']:.2f}x the images/s of one "
              f"predict.py run over the {len(samples)} images (--no_heatmaps)")


def score_one_by_one(path: str, refs: str, samples, extractor, device) -> float:
    """Load an Inferencer (not timed), then score each image alone; returns when the timing started."""
    inferencer = Inferencer(path, ref_images=refs, extractor=extractor, device=str(device))
    inferencer.predict(samples[0].image)   # warm-up, as the first image of a line
    started = time.perf_counter()
    for sample in samples:
        inferencer.predict(sample.image)
    return started


def evaluate_once(path: str, extractor, samples, ref_files, args, device) -> None:
    """The evaluation of the same images against the same references (encoded as predict encodes them)."""
    state = checkpoint.open_model(path)
    model = checkpoint.build_model(state, extractor, 0.4, device)
    bank = encode_references(ref_files, extractor, args.batch_size, device)
    evaluate(model, extractor, {args.class_name: samples}, {args.class_name: bank},
             EvalConfig(shots=(bank.num_shots,), batch_size=args.batch_size), device, args.num_workers)


if __name__ == "__main__":
    from utils.errors import run_cli

    raise SystemExit(run_cli(main))
