r"""Per-class bar chart of one metric from a metrics CSV: which unseen classes fail.

    python classwise_failure.py --csv checkpoints/mvtec_to_visa_4shot/mvtec_to_visa_4shot_epoch60_metrics.csv \
        --metric "Pixel AUC" --top_k 3 --out figures/classwise_failure.png
    python classwise_failure.py --csv .../mvtec_to_visa_2shot_epoch60_metrics.csv \
        --compare .../mvtec_to_visa_8shot_epoch60_metrics.csv --labels 2-shot 8-shot --out figures/2_vs_8.png

Bars sorted best to worst, the --top_k worst in red, values on the bars, the Mean as a dashed line.
With --compare, the two runs side by side and their per-class difference; the numbers go to <out>.csv.
"""
from __future__ import annotations

import argparse
import os

from utils.atomic import save_csv
from utils.formats.run_outputs import read_metrics_csv
from utils.report.analysis_plots import check_metrics, plot_classwise
from utils.cli.options import Parser, at_least
from utils.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__)
    parser.add_argument("--csv", required=True, help="a <run>_epoch<E>_metrics.csv")
    parser.add_argument("--metric", default="Pixel AUC")
    parser.add_argument("--top_k", type=at_least(0), default=3, help="worst classes drawn in red")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="figures/classwise_failure.png")
    parser.add_argument("--compare", default=None, help="a second metrics CSV drawn side by side")
    parser.add_argument("--labels", nargs=2, default=None, help="names of the two runs (default: the file names)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_metrics([args.metric], "--metric")
    table = read_metrics_csv(args.csv, "--csv")
    compare = read_metrics_csv(args.compare, "--compare") if args.compare else None
    labels = args.labels or [os.path.basename(p).replace("_metrics.csv", "") for p in (args.csv, args.compare or "")]
    result = plot_classwise(table, args.metric, args.out, args.top_k, args.title, compare, labels)
    numbers = os.path.splitext(args.out)[0] + ".csv"
    save_csv(numbers, result)
    print(result.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out} and {numbers}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
