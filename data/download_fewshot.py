"""Download the authors' few-shot normal reference images from the Hugging Face hub.

    python data/download_fewshot.py                      # 4shot/ and 8shot/ of every dataset into ./data
    python data/download_fewshot.py --shots 4 --datasets mvtec visa

The release (dataset repository ``xcyao00/resad-data``) holds ``4shot/`` and
``8shot/`` folders with ``<dataset>/<class>/train/good/*`` images; archives in
it, if any, are unpacked next to themselves.  Needs network access.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import UserError, run_cli  # noqa: E402

REPO_ID = "xcyao00/resad-data"
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="destination folder")
    parser.add_argument("--shots", nargs="+", default=["4", "8"], choices=["4", "8"])
    parser.add_argument("--datasets", nargs="+", default=None, help="only these datasets (default: all)")
    parser.add_argument("--repo_id", default=REPO_ID)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from huggingface_hub import snapshot_download

    # folders, or archives named like them (4shot.zip, 4shot/mvtec.zip)
    prefixes = [f"{k}shot/{d}" for k in args.shots for d in args.datasets] if args.datasets else \
        [f"{k}shot" for k in args.shots]
    patterns = [f"{p}/**" for p in prefixes] + [f"{p}.*" for p in prefixes]
    def failure(reason: str) -> UserError:
        return UserError(f"cannot download {args.repo_id} from the Hugging Face hub ({reason}); "
                         f"check the network, or fetch it by hand from https://huggingface.co/datasets/{args.repo_id} "
                         f"into {args.out}")

    try:
        snapshot_download(repo_id=args.repo_id, repo_type="dataset", local_dir=args.out, allow_patterns=patterns)
    except Exception as err:  # network, authentication and missing-repository errors
        raise failure(type(err).__name__) from None
    for folder, _, files in os.walk(args.out):
        for name in files:
            if name.endswith(ARCHIVES):
                shutil.unpack_archive(os.path.join(folder, name), folder)
    found = {}
    for k in args.shots:
        root = os.path.join(args.out, f"{k}shot")
        found[root] = sorted(d for d in os.listdir(root) if not d.startswith(".")) if os.path.isdir(root) else []
    if not any(found.values()):
        raise failure("nothing was obtained")
    for root, names in found.items():
        print(f"{root}: {', '.join(names) if names else 'nothing found'}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
