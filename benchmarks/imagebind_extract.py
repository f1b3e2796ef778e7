"""Cost of ImageBind-Huge feature extraction at full size: peak memory and time per image.

    python benchmarks/imagebind_extract.py                       # CPU, 4 images in batches of 2
    python benchmarks/imagebind_extract.py --images 8 --batch_size 4 --flows

The trunk is timm's ViT-H/14 shaped like ImageBind's (``models.imagebind.imagebind_vit``)
with random weights (speed and memory do not depend on them; no 4.5 GB download).  The
extraction is the real code path: the pruned 32-block trunk, the outputs of blocks 7, 15,
23 and 31 as 1280 x 16 x 16 maps, under ``torch.inference_mode()``, in batches.  The
images are the real few-shot images in ../shared/data/fewshot when present, random
tensors otherwise; the first batch is a warm-up and is not timed.  ``--flows`` also
times building main_ib.py's flows (4 levels x 4 coupling layers on 1280 channels:
FrEIA draws a random 1280 x 1280 rotation per coupling layer), which a run does once.

Prints the build time, the time per image, and the peak resident memory of the process
after each step (ru_maxrss) plus, on CUDA, the peak allocated GPU memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from datasets import AnomalyDataset, Sample  # noqa: E402
from models.extractor import IMAGEBIND_BACKBONE, ViTExtractor, build_extractor  # noqa: E402
from models.imagebind import BLOCKS, CLIP_MEAN, CLIP_STD, imagebind_vit  # noqa: E402
from utils.runtime import resolve_device, tune_cpu_allocator  # noqa: E402

FEWSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "fewshot")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def images(count: int, extractor: ViTExtractor) -> torch.Tensor:
    """``count`` pre-processed images: real few-shot images when available, random ones otherwise."""
    files = []
    if os.path.isdir(FEWSHOT):
        for folder, _, names in sorted(os.walk(FEWSHOT)):
            files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith((".png", ".jpg", ".jpeg"))]
    if not files:
        return torch.randn(count, 3, extractor.image_size, extractor.image_size)
    data = AnomalyDataset([Sample(f, 0, (), "x") for f in files[:count]], extractor.image_size,
                          extractor.mean, extractor.std)
    batch = torch.stack([data[i]["image"] for i in range(len(data))])
    return batch.repeat((count + len(batch) - 1) // len(batch), 1, 1, 1)[:count]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="timed images (after one warm-up batch)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=None,
                        help="an ImageBind checkpoint: build through build_extractor (memory-mapped, strict) instead")
    parser.add_argument("--flows", action="store_true", help="also time building main_ib.py's 1280-channel flows")
    args = parser.parse_args(argv)
    tune_cpu_allocator()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, {torch.get_num_threads()} threads; peak RSS after imports {peak_rss_gib():.2f} GiB")

    started = time.perf_counter()
    if args.weights:
        extractor = build_extractor(IMAGEBIND_BACKBONE, args.weights, device=device)
    else:
        extractor = ViTExtractor(imagebind_vit(), IMAGEBIND_BACKBONE, BLOCKS, mean=CLIP_MEAN, std=CLIP_STD).to(device)
    params = sum(p.numel() for p in extractor.parameters())
    print(f"built {IMAGEBIND_BACKBONE} ({args.weights or 'random weights'}, {params / 1e6:.0f} M parameters, "
          f"{params * 4 / 2 ** 30:.2f} GiB) in {time.perf_counter() - started:.1f} s; "
          f"peak RSS {peak_rss_gib():.2f} GiB")

    batch = images(args.images + args.batch_size, extractor)
    with torch.inference_mode():
        features = extractor(batch[: args.batch_size].to(device))  # warm-up
        shapes = [tuple(f.shape[1:]) for f in features]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for chunk in batch[args.batch_size:].split(args.batch_size):
            features = [f.cpu() for f in extractor(chunk.to(device))]
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    print(f"extraction: levels {shapes} (blocks {list(BLOCKS)}); {args.images} images in batches of "
          f"{args.batch_size}: {elapsed / args.images:.2f} s per image ({args.images / elapsed:.2f} images/s); "
          f"peak RSS {peak_rss_gib():.2f} GiB"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""))

    if args.flows:
        from models.resad import ModelConfig, ResAD

        started = time.perf_counter()
        ResAD(extractor.channels, ModelConfig(coupling_layers=4, flow_arch="flow_model"))
        print(f"built ResAD for {len(extractor.channels)} x 1280-channel levels (flow_model, 4 coupling layers) in "
              f"{time.perf_counter() - started:.1f} s (once per run); peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
