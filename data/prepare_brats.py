r"""Build the BraTS test split of the ResAD authors, and a few-shot reference folder, from BraTS2021.

    python data/prepare_brats.py --brats_dir /data/BraTS2021_Training_Data --out ./data/brats

reads <brats_dir>/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,seg}.nii.gz and writes

    <out>/brain/test/good/BraTS2021_XXXXX.jpg                  slices without lesion
    <out>/brain/test/lesion/BraTS2021_XXXXX.jpg                slices with lesion
    <out>/brain/ground_truth/lesion/BraTS2021_XXXXX_mask.png   their masks, 0/255
    <fewshot_out>/brain/train/good/BraTS2021_XXXXX.jpg         --shots normal references
                                                               (default <out>_<shots>shot)

The recipe is the authors' answer in their issue tracker: the BraTS2021 training
volumes, FLAIR, one axial slice per volume (``volume[:, :, 83]``), min-max scaled
to 8 bits per slice (a constant slice becomes black); the segmentation of the
same slice, binarised, is the mask; the slice is "lesion" when the mask is not
empty, else "good".

Orientation: nibabel returns the voxels in (x, y, z) order, so ``volume[:, :, 83]``
shows the head lying on its side. The slice is turned by the volume's header
(its axis codes) so that anterior is at the top and the patient's right on the
left of the image (the radiological convention of clinical viewers). For the
BraTS release (LPS voxel order) that is a plain transpose; the mask gets exactly
the same transform, from the FLAIR's header.

References: the volumes whose slice is lesion-free are shuffled with ``--seed``
and the first ``--shots`` of them become the few-shot references; they are left
out of the test split, which holds every other volume. Same volumes and flags,
same split.

Nothing is half-written: every volume is read and checked before anything is
written, each output folder is assembled under a temporary name beside it and
renamed into place at the end (an existing ``brain`` folder there is replaced).
"""
from __future__ import annotations

import argparse
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import atomic  # noqa: E402
from utils.cli.options import Parser  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

CLASS_NAME = "brain"
LESION, GOOD = "lesion", "good"
JPEG_QUALITY = 95
NIFTI_SUFFIXES = (".nii.gz", ".nii")
RELEASE_LAYOUT = "<brats_dir>/BraTS2021_XXXXX/BraTS2021_XXXXX_flair.nii.gz and ..._seg.nii.gz"
_READ_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error)


@dataclass(frozen=True)
class Volume:
    """One case of the release: its folder name and its FLAIR and segmentation files."""

    name: str
    flair: str
    seg: str


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__)
    parser.add_argument("--brats_dir", default="", help="the BraTS2021 training data: BraTS2021_XXXXX/ folders")
    parser.add_argument("--out", default="./data/brats", help="dataset root to write (<out>/brain/...)")
    parser.add_argument("--fewshot_out", default=None,
                        help="few-shot root to write (<fewshot_out>/brain/train/good); default <out>_<shots>shot")
    parser.add_argument("--slice", type=int, default=83, help="axial slice index, volume[:, :, SLICE]")
    parser.add_argument("--shots", type=int, default=4, help="normal reference slices, from volumes left out "
                                                              "of the test split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of the reference volumes")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- finding and reading volumes

def _modality_file(folder: str, name: str, modality: str) -> Optional[str]:
    for suffix in NIFTI_SUFFIXES:
        path = os.path.join(folder, f"{name}_{modality}{suffix}")
        if os.path.isfile(path):
            return path
    return None


def find_volumes(brats_dir: str) -> List[Volume]:
    """The volumes under ``brats_dir`` by name; a folder lacking FLAIR or seg is skipped with a warning."""
    if not brats_dir:
        raise UserError(f"--brats_dir is required: give the BraTS2021 training data folder ({RELEASE_LAYOUT})")
    if not os.path.isdir(brats_dir):
        raise UserError(f"--brats_dir {brats_dir}: folder not found; give the BraTS2021 training data folder")
    volumes = []
    for name in sorted(os.listdir(brats_dir)):
        folder = os.path.join(brats_dir, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        files = {m: _modality_file(folder, name, m) for m in ("flair", "seg")}
        missing = [f"{name}_{m}.nii.gz" for m, path in files.items() if path is None]
        if missing:
            print(f"warning: skipping volume {name}: no {' or '.join(missing)} in {folder}", file=sys.stderr,
                  flush=True)
            continue
        volumes.append(Volume(name, files["flair"], files["seg"]))
    if not volumes:
        raise UserError(f"--brats_dir {brats_dir}: no BraTS volumes found (expected {RELEASE_LAYOUT}); "
                        "pass the folder that holds the BraTS2021_XXXXX folders")
    return volumes


def _load(path: str) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except _READ_ERRORS as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}); restore it from the BraTS2021 release "
                        "or remove its volume folder") from None


def _axial_plane(image: nib.Nifti1Image, path: str, index: int) -> np.ndarray:
    try:
        return np.asarray(image.dataobj[:, :, index])
    except _READ_ERRORS as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: the file is truncated or damaged); "
                        "restore it from the BraTS2021 release or remove its volume folder") from None


def axial_codes(image: nib.Nifti1Image, path: str) -> Tuple[str, str]:
    """Anatomical directions (``nib.aff2axcodes``) of the first two voxel axes; the third must be axial."""
    codes = nib.aff2axcodes(image.affine)
    if codes[2] not in ("S", "I") or None in codes:  # then the first two are one of L/R and one of A/P
        raise UserError(f"{path}: its voxel axes point {''.join(map(str, codes))}, so volume[:, :, k] is not an "
                        "axial slice; the BraTS2021 release stores axial slices along the third axis")
    return codes[0], codes[1]


def upright(plane: np.ndarray, codes: Sequence[str]) -> np.ndarray:
    """An axial slice turned so that rows run anterior -> posterior and columns the patient's right -> left.

    ``codes`` are the directions in which the slice's two axes point (``("L", "P")`` for BraTS).
    """
    rows, columns = codes
    if rows in ("L", "R"):  # the first axis is left-right: it becomes the columns
        plane, rows, columns = plane.T, columns, rows
    if rows == "A":
        plane = plane[::-1, :]
    if columns == "R":
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane)


def min_max_uint8(plane: np.ndarray) -> np.ndarray:
    """Scale a slice linearly so that its minimum is 0 and its maximum 255; a constant slice is all 0."""
    values = plane.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def read_slice(volume: Volume, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """The 8-bit FLAIR slice and the boolean lesion mask of one volume, both upright."""
    flair, seg = _load(volume.flair), _load(volume.seg)
    if len(flair.shape) != 3:
        raise UserError(f"{volume.flair} has shape {flair.shape}, not a 3-D volume; restore it from the release")
    if seg.shape != flair.shape:
        raise UserError(f"{volume.seg} has shape {seg.shape} but its FLAIR {volume.flair} {flair.shape}; "
                        "restore them from the release")
    depth = flair.shape[2]
    if not 0 <= index < depth:
        raise UserError(f"--slice {index}: volume {volume.name} has {depth} axial slices (0 to {depth - 1}); "
                        "choose a slice that every volume has")
    codes = axial_codes(flair, volume.flair)
    image = min_max_uint8(upright(_axial_plane(flair, volume.flair, index), codes))
    mask = upright(_axial_plane(seg, volume.seg, index), codes) > 0
    return image, mask


def read_slices(volumes: Sequence[Volume], index: int) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Every volume's slice and mask, by name (a BraTS slice pair is 115 KB: 144 MB for the 1,251 volumes)."""
    slices = {}
    with tqdm(volumes, desc=f"reading slice {index}", unit="volume", dynamic_ncols=True) as bar:
        for volume in bar:
            slices[volume.name] = read_slice(volume, index)
    return slices


# --------------------------------------------------------------------------- the split and the files

def choose_references(normal_names: Sequence[str], shots: int, seed: int) -> List[str]:
    """The first ``shots`` of the lesion-free volumes in the order of a ``seed``-ed shuffle of their sorted names."""
    order = np.random.default_rng(seed).permutation(len(normal_names))
    return [sorted(normal_names)[i] for i in order[:shots]]


def _save(array: np.ndarray, path: str, **options) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **options)


def write_split(slices: Dict[str, Tuple[np.ndarray, np.ndarray]], references: Sequence[str], out: str,
                fewshot_out: str) -> Dict[str, int]:
    """Write the test split under ``<out>/brain`` and the references under ``<fewshot_out>/brain``; returns
    the number of good and lesion test images. Both folders are assembled aside and renamed at the end."""
    counts = {GOOD: 0, LESION: 0}
    with atomic.atomic_folder(os.path.join(out, CLASS_NAME)) as test_root, \
            atomic.atomic_folder(os.path.join(fewshot_out, CLASS_NAME)) as reference_root:
        for name, (image, mask) in tqdm(slices.items(), desc="writing", unit="image", leave=False,
                                        dynamic_ncols=True):
            if name in references:
                _save(image, os.path.join(reference_root, "train", GOOD, f"{name}.jpg"), quality=JPEG_QUALITY)
                continue
            kind = LESION if mask.any() else GOOD
            _save(image, os.path.join(test_root, "test", kind, f"{name}.jpg"), quality=JPEG_QUALITY)
            if kind == LESION:
                _save(mask.astype(np.uint8) * 255, os.path.join(test_root, "ground_truth", LESION, f"{name}_mask.png"))
            counts[kind] += 1
    return counts


def _check_outputs(args: argparse.Namespace) -> str:
    """Check the flags that need no volume; returns the few-shot root."""
    if args.shots < 1:
        raise UserError(f"--shots {args.shots}: must be at least 1")
    fewshot_out = args.fewshot_out or f"{os.path.normpath(args.out)}_{args.shots}shot"
    atomic.check_writable(args.out, "--out")
    atomic.check_writable(fewshot_out, "--fewshot_out")
    if os.path.abspath(fewshot_out) == os.path.abspath(args.out):
        raise UserError(f"--fewshot_out {fewshot_out}: the same folder as --out; give the references their own")
    return fewshot_out


def main(argv=None) -> None:
    args = parse_args(argv)
    fewshot_out = _check_outputs(args)
    volumes = find_volumes(args.brats_dir)
    slices = read_slices(volumes, args.slice)
    normal = [name for name, (_, mask) in slices.items() if not mask.any()]
    if len(normal) <= args.shots:
        raise UserError(f"--shots {args.shots}: only {len(normal)} of the {len(slices)} volumes have a lesion-free "
                        f"slice {args.slice}, and the test split needs one too; lower --shots or choose another --slice")
    references = choose_references(normal, args.shots, args.seed)
    counts = write_split(slices, references, args.out, fewshot_out)
    print(f"read {len(volumes)} volumes (slice {args.slice}): {counts[GOOD]} good and {counts[LESION]} lesion test "
          f"images in {os.path.join(args.out, CLASS_NAME)}; {len(references)} reference shots (--seed {args.seed}) "
          f"in {os.path.join(fewshot_out, CLASS_NAME, 'train', GOOD)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
