r"""Encode the few-shot normal reference images of a dataset for testing.

    python extract_ref_features.py --dataset mvtec --few_shot_dir ./data/4shot/mvtec \
        --save_dir ./ref_features/w50/mvtec_4shot

writes <save_dir>/<class>/layer1.npy, layer2.npy, layer3.npy (float32, (k*H*W, C),
image-major) and meta.json (backbone, image files).
"""
from __future__ import annotations

import argparse

from models.extractor import DEFAULT_BACKBONE, build_extractor
from utils.references import extract_reference_features
from utils.runtime import resolve_device
from utils.errors import run_cli
from utils.runtime import tune_cpu_allocator


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mvtec", help="mvtec, visa, btad, mvtec3d, mpdd, mvtecloco, brats, demo, or folder "
                             "(your own: the classes are the sub-folders of --few_shot_dir)")
    parser.add_argument("--few_shot_dir", default="./data/4shot/mvtec", help="<few_shot_dir>/<class>/train/good/*")
    parser.add_argument("--save_dir", default="./ref_features/w50/mvtec_4shot")
    parser.add_argument("--shots", type=int, default=None, help="use the first N images per class (default: all)")
    parser.add_argument("--classes", nargs="+", default=None, help="only these classes (default: all of the dataset)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="any timm CNN (features_only)")
    parser.add_argument("--backbone_weights", default=None, help="local state_dict for the backbone (offline use)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    device = resolve_device(args.device)
    extractor = build_extractor(args.backbone, args.backbone_weights, device=device)
    written = extract_reference_features(args.dataset, args.few_shot_dir, args.save_dir, extractor,
                                         shots=args.shots, classes=args.classes, batch_size=args.batch_size)
    print(f"reference features of {len(written)} classes ({extractor.name}) written to {args.save_dir}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
