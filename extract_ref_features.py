r"""Encode the few-shot normal reference images of a dataset for testing.

    python extract_ref_features.py --dataset mvtec --few_shot_dir ./data/4shot/mvtec \
        --save_dir ./ref_features/w50/mvtec_4shot

    python extract_ref_features.py --backbone imagebind_huge --dataset mvtec \
        --few_shot_dir ./data/4shot/mvtec --save_dir ./ref_features/imagebind/mvtec_4shot

writes <save_dir>/<class>/layer1.npy ... layerN.npy, one per feature level (float32,
(k*H*W, C), image-major) and meta.json (backbone, its layers, --amp, --resize, image files).
"""
from __future__ import annotations

import argparse

from utils.atomic import check_writable
from utils.cli.adapters import backbone_config
from utils.cli.options import Parser, add_amp_argument, add_backbone_arguments, add_resize_argument, at_least
from utils.errors import run_cli
from utils.run.extraction import extract_reference_features, reference_files
from utils.runtime import resolve_device, tune_cpu_allocator


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__)
    parser.add_argument("--dataset", default="mvtec", help="mvtec, visa, btad, mvtec3d, mpdd, mvtecloco, brats, demo, "
                        "or folder (your own: the classes are the sub-folders of --few_shot_dir)")
    parser.add_argument("--few_shot_dir", default="./data/4shot/mvtec", help="<few_shot_dir>/<class>/train/good/*")
    parser.add_argument("--save_dir", default="./ref_features/w50/mvtec_4shot")
    parser.add_argument("--shots", type=at_least(1), default=None,
                        help="reference shots: the first N images per class (default: all)")
    parser.add_argument("--classes", nargs="+", default=None, help="only these classes (default: all of the dataset)")
    add_backbone_arguments(parser)
    add_amp_argument(parser)
    add_resize_argument(parser)
    parser.add_argument("--batch_size", type=at_least(1), default=8)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tune_cpu_allocator()
    device = resolve_device(args.device)
    backbone = backbone_config(args)
    # Every path first: a typo must not cost a backbone download.
    backbone.check_paths()
    reference_files(args.dataset, args.few_shot_dir, args.shots, args.classes, args.batch_size)
    check_writable(args.save_dir, "--save_dir")
    extractor = backbone.build(device)
    written = extract_reference_features(args.dataset, args.few_shot_dir, args.save_dir, extractor,
                                         shots=args.shots, classes=args.classes, batch_size=args.batch_size)
    print(f"reference features of {len(written)} classes ({extractor.name}) written to {args.save_dir}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
