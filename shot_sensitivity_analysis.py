r"""Plot metrics against the number of reference shots from main_extended_multi_shot.py results.

    python shot_sensitivity_analysis.py --checkpoint_dir ./checkpoints --setting mvtec_to_visa visa_to_mvtec \
        --metrics "Image AUC" "Pixel AUC" --out figures/shots_vs_auroc.png

Reads <checkpoint_dir>/<setting>_<k>shot/<setting>_<k>shot_epoch<E>_metrics.csv (the Mean row) of the
latest epoch by number, or --epoch.  Draws one line per setting and metric (error bars when the CSVs
have "<metric> std" columns, from --ref_groups) and writes the plotted numbers next to the PNG (.csv).
"""
from __future__ import annotations

import argparse

from utils.report.analysis_plots import plot_shot_sensitivity, shot_sensitivity_table
from utils.cli.options import Parser
from utils.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__)
    parser.add_argument("--checkpoint_dir", default="./checkpoints", help="--checkpoint_path of the multi-shot runs")
    parser.add_argument("--setting", nargs="+", default=None,
                        help="one or more settings (default: every <setting>_<k>shot folder found)")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="default: every k found")
    parser.add_argument("--metrics", nargs="+", default=["Image AUC", "Pixel AUC"])
    parser.add_argument("--epoch", type=int, default=None, help="default: the latest epoch of each folder")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="figures/shots_vs_auroc.png")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    frame = shot_sensitivity_table(args.checkpoint_dir, args.setting, args.shots, args.metrics, args.epoch)
    table = plot_shot_sensitivity(frame, args.out, args.title)
    print(frame.drop(columns="csv").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out} and {table}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
