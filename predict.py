r"""Anomaly scores, labels and maps of new images, from a trained checkpoint and k normal images of their class.

    python predict.py --checkpoint ./checkpoints/mvtec_to_visa/mvtec_to_visa_latest.pth \
        --ref_images ./my_part/good_refs --images ./my_part/incoming --out ./predictions/my_part

    # references encoded beforehand (extract_ref_features.py), a fixed threshold, the raw maps, no PNGs
    python predict.py --checkpoint CKPT --ref_features ./ref_features/my_parts/part_a --images a.png b.png \
        --out ./predictions/part_a --threshold 1.25 --save_maps --no_heatmaps

    # a line that feeds images as they arrive: paths on standard input, one per line
    find /incoming -name '*.png' | python predict.py --checkpoint CKPT --ref_images REFS --images - --out OUT

Writes to --out: scores.csv (image, score, label, threshold, error), heatmaps/<name>.png (input and
map overlay), maps/<name>.npy with --save_maps, calibration-<model>.json and predict_run.json.  Each
image is scored on its own (--normalization references, the default): the maps' statistics and the
threshold come from the k references (each scored against the other k-1; one reference against
itself outside each position's neighbourhood), so a part gets the same score and label whatever
else is scored with it.  Rows are appended a batch at a time, and a re-run with the same --out skips
the images already scored.  --normalization set normalises over the run's images instead, as the
authors' evaluation does over a test split.  Without --threshold the threshold is the maximum of the
references' scores (--threshold_quantile Q: their quantile); docs/predict.md.
"""
from __future__ import annotations

import argparse

from utils.cli.adapters import predict_config
from utils.cli.options import Parser, add_predict_arguments
from utils.cli.presets import parse_with_presets, preset_line
from utils.errors import run_cli
from utils.run.predict_run import predict
from utils.runtime import tune_cpu_allocator


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_presets(add_predict_arguments(Parser(description=__doc__)), argv, demo=False)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(preset_line(args.preset))
    tune_cpu_allocator()
    predict(predict_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
