"""data/prepare_brats.py on small synthetic BraTS-like volumes, and the prepared split through
extract_ref_features.py --dataset brats and main.py --setting mvtec_to_brats."""
from __future__ import annotations

import json
import os
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from utils.errors import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "data"))
import prepare_brats  # noqa: E402

X, Y, Z, SLICE = 24, 20, 90, 83   # x: patient's right -> left, y: anterior -> posterior (BraTS stores LPS)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # the affine of the BraTS2021 release (voxel axes point L, P, S)
RAS = np.eye(4)
LESION_AT_SLICE = (0, 3, 6, 9)        # the other volumes are lesion-free at SLICE
LESION_ELSEWHERE = (2, 5)             # ... though these have a lesion on another slice
CONSTANT_SLICE = 1                    # its FLAIR slice is a single value
SHOTS = 2


def name_of(i: int) -> str:
    return f"BraTS2021_{i:05d}"


def flair_volume(i: int) -> np.ndarray:
    """Random voxels, and on SLICE a smooth ramp (JPEG keeps it) that differs per volume."""
    rng = np.random.default_rng(i)
    volume = rng.integers(0, 3000, (X, Y, Z)).astype(np.int16)
    x, y = np.mgrid[:X, :Y]
    volume[:, :, SLICE] = 200 + 10 * i + 31 * x + 17 * y + 400 * ((x - 12) ** 2 + (y - 9) ** 2 < 16)
    if i == CONSTANT_SLICE:
        volume[:, :, SLICE] = 777
    return volume


def seg_volume(i: int) -> np.ndarray:
    seg = np.zeros((X, Y, Z), np.uint8)
    if i in LESION_AT_SLICE:
        seg[3 + i % 4: 9, 5:8 + i % 3, SLICE] = 2
        seg[10:12, 14:17, SLICE] = 4
        seg[15, 2, SLICE] = 1
    if i in LESION_ELSEWHERE:
        seg[5:15, 5:15, 40] = 2
    return seg


def write_case(root, name: str, flair=None, seg=None, affine=LPS) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for modality, volume in (("flair", flair), ("seg", seg)):
        if volume is not None:
            nib.save(nib.Nifti1Image(volume, affine), str(folder / f"{name}_{modality}.nii.gz"))


def expected_image(i: int) -> np.ndarray:
    """The slice, rows anterior -> posterior, min-max scaled to 0..255 (float)."""
    plane = flair_volume(i)[:, :, SLICE].T.astype(np.float64)
    span = plane.max() - plane.min()
    return np.zeros_like(plane) if span == 0 else (plane - plane.min()) / span * 255


def read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(np.float64)


def prepare(capsys, *args):
    code = run_cli(prepare_brats.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    """Ten volumes, one without seg, one without FLAIR, prepared once with --shots 2."""
    base = tmp_path_factory.mktemp("brats")
    source = base / "BraTS2021_Training_Data"
    for i in range(10):
        write_case(source, name_of(i), flair_volume(i), seg_volume(i))
    write_case(source, name_of(100), flair=flair_volume(100))
    write_case(source, name_of(101), seg=seg_volume(0))
    out = base / "prepared"
    code = run_cli(prepare_brats.main, ["--brats_dir", str(source), "--out", str(out), "--shots", str(SHOTS)])
    assert code == 0
    return {"source": source, "out": out, "fewshot": base / f"prepared_{SHOTS}shot"}


def listing(folder) -> list[str]:
    return sorted(p.stem for p in folder.iterdir()) if folder.is_dir() else []


def test_split_images_and_masks_follow_the_recipe(brats):
    test = brats["out"] / "brain" / "test"
    references = set(listing(brats["fewshot"] / "brain" / "train" / "good"))
    good, lesion = listing(test / "good"), listing(test / "lesion")
    assert sorted(good + lesion + sorted(references)) == [name_of(i) for i in range(10)]
    assert lesion == [name_of(i) for i in LESION_AT_SLICE]  # only the seg of SLICE decides
    assert {name_of(i) for i in LESION_ELSEWHERE} <= set(good) | references
    for i in range(10):
        folder = test / ("lesion" if i in LESION_AT_SLICE else "good")
        path = folder / f"{name_of(i)}.jpg"
        if name_of(i) in references:
            path = brats["fewshot"] / "brain" / "train" / "good" / f"{name_of(i)}.jpg"
        image = read(path)
        assert image.shape == (Y, X)  # 20 rows (anterior -> posterior), 24 columns
        assert np.abs(image - expected_image(i)).mean() < 1.5 and np.abs(image - expected_image(i)).max() < 20
    masks = brats["out"] / "brain" / "ground_truth" / "lesion"
    assert listing(masks) == [f"{name_of(i)}_mask" for i in LESION_AT_SLICE]
    for i in LESION_AT_SLICE:
        mask = read(masks / f"{name_of(i)}_mask.png")
        assert np.array_equal(mask, (seg_volume(i)[:, :, SLICE].T > 0) * 255.0)  # labels 1, 2 and 4 -> 255


def test_constant_slice_is_black(brats):
    name = name_of(CONSTANT_SLICE)
    paths = list(brats["out"].rglob(f"{name}.jpg")) + list(brats["fewshot"].rglob(f"{name}.jpg"))
    assert len(paths) == 1 and not read(paths[0]).any()


def test_references_are_normal_slices_of_volumes_left_out_of_the_test_split(brats, tmp_path, capsys):
    references = listing(brats["fewshot"] / "brain" / "train" / "good")
    tested = {p.stem for p in (brats["out"] / "brain" / "test").rglob("*.jpg")}
    normal = {name_of(i) for i in range(10) if i not in LESION_AT_SLICE}
    assert len(references) == SHOTS and set(references) <= normal and not set(references) & tested
    # the same volumes and seed give the same references; another seed draws from the same normal volumes
    for seed, same in ((0, True), (3, None)):
        code, _, _ = prepare(capsys, "--brats_dir", brats["source"], "--out", tmp_path / f"s{seed}",
                             "--shots", SHOTS, "--seed", seed)
        again = listing(tmp_path / f"s{seed}_{SHOTS}shot" / "brain" / "train" / "good")
        assert code == 0 and len(again) == SHOTS and set(again) <= normal
        if same:
            assert again == references


def test_skipped_volumes_are_named_and_the_summary_counts(brats, tmp_path, capsys):
    code, out, err = prepare(capsys, "--brats_dir", brats["source"], "--out", tmp_path / "o", "--shots", 3,
                             "--fewshot_out", tmp_path / "refs")
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert name_of(100) in warnings[0] and f"{name_of(100)}_seg.nii.gz" in warnings[0]
    assert name_of(101) in warnings[1] and f"{name_of(101)}_flair.nii.gz" in warnings[1]
    assert not list(tmp_path.rglob(f"{name_of(100)}*")) and not list(tmp_path.rglob(f"{name_of(101)}*"))
    assert "read 10 volumes" in out and "3 good and 4 lesion" in out and "3 reference shots" in out
    assert len(listing(tmp_path / "refs" / "brain" / "train" / "good")) == 3


@pytest.mark.parametrize("affine", ["LPS", "RAS"])
def test_slices_are_upright_with_the_patients_right_on_the_left(tmp_path, capsys, affine):
    """A bright block in the patient's right-anterior quarter ends up top-left, whatever the voxel order."""
    volume = np.zeros((X, Y, Z), np.int16)
    right, anterior = (slice(0, 6), slice(0, 5)) if affine == "LPS" else (slice(X - 6, X), slice(Y - 5, Y))
    volume[right, anterior, SLICE] = 1000
    volume[X // 2, Y // 2, SLICE] = 10
    seg = np.zeros((X, Y, Z), np.uint8)
    seg[right, anterior, SLICE] = 1
    source = tmp_path / "src"
    for i in range(3):
        write_case(source, name_of(i), volume, seg if i == 0 else np.zeros_like(seg), LPS if affine == "LPS" else RAS)
    assert prepare(capsys, "--brats_dir", source, "--out", tmp_path / "o", "--shots", 1)[0] == 0
    image = read(tmp_path / "o" / "brain" / "test" / "lesion" / f"{name_of(0)}.jpg")
    mask = read(tmp_path / "o" / "brain" / "ground_truth" / "lesion" / f"{name_of(0)}_mask.png")
    expected = np.zeros((Y, X))
    expected[:5, :6] = 255
    assert np.array_equal(mask, expected) and np.abs(image - expected).mean() < 3


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def written_files(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize("case", ["no_flag", "missing_dir", "no_volumes", "slice_out_of_range", "out_is_a_file",
                                  "too_many_shots", "zero_shots"])
def test_bad_input_is_one_line_and_writes_nothing(brats, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {"--brats_dir": brats["source"], "--out": out}
    expect = {"no_flag": ("--brats_dir is required",), "missing_dir": ("--brats_dir", "nowhere", "not found"),
              "no_volumes": ("--brats_dir", "no BraTS volumes", "BraTS2021_XXXXX_flair.nii.gz"),
              "slice_out_of_range": ("--slice 90", name_of(0), "90 axial slices"),
              "out_is_a_file": ("--out", "is a file"), "too_many_shots": ("--shots 6", "only 6 of the 10"),
              "zero_shots": ("--shots 0", "at least 1")}[case]
    extra = []
    if case == "no_flag":
        del args["--brats_dir"]
    elif case == "missing_dir":
        args["--brats_dir"] = tmp_path / "nowhere"
    elif case == "no_volumes":
        (tmp_path / "empty" / "notes").mkdir(parents=True)
        args["--brats_dir"] = tmp_path / "empty"
    elif case == "out_is_a_file":
        (tmp_path / "blocker").write_text("x")
        args["--out"] = out = tmp_path / "blocker" / "out"
    else:
        extra = {"slice_out_of_range": ["--slice", Z], "too_many_shots": ["--shots", 6],
                 "zero_shots": ["--shots", 0]}[case]
    argv = [str(item) for key, value in args.items() for item in (key, value)] + [str(e) for e in extra]
    assert_one_line_error(*prepare(capsys, *argv), *expect)
    assert not written_files(out) and not written_files(tmp_path / f"out_{SHOTS}shot")


def test_a_damaged_volume_leaves_the_previous_split_intact(brats, tmp_path, capsys):
    source = tmp_path / "src"
    for i in range(4):
        write_case(source, name_of(i), flair_volume(i), seg_volume(i))
    out = tmp_path / "o"
    assert prepare(capsys, "--brats_dir", source, "--out", out, "--shots", 1)[0] == 0
    before = {p: p.read_bytes() for p in written_files(tmp_path / "o") + written_files(tmp_path / "o_1shot")}
    victim = source / name_of(3) / f"{name_of(3)}_flair.nii.gz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # header intact, voxels cut
    assert_one_line_error(*prepare(capsys, "--brats_dir", source, "--out", out, "--shots", 1), str(victim))
    after = {p: p.read_bytes() for p in written_files(tmp_path / "o") + written_files(tmp_path / "o_1shot")}
    assert after == before and os.listdir(out) == ["brain"] and os.listdir(tmp_path / "o_1shot") == ["brain"]


def test_a_volume_stored_along_another_axis_is_refused(tmp_path, capsys):
    coronal = np.array([[-1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # voxel axes L, S, P
    for i in range(3):
        write_case(tmp_path / "src", name_of(i), flair_volume(i), seg_volume(i), coronal)
    code, out, err = prepare(capsys, "--brats_dir", tmp_path / "src", "--out", tmp_path / "o", "--shots", 1)
    assert_one_line_error(code, out, err, f"{name_of(0)}_flair.nii.gz", "point LSP", "not an axial slice")
    assert not written_files(tmp_path / "o")


def test_a_rerun_replaces_the_split_and_a_failed_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    source, out, refs = tmp_path / "src", tmp_path / "o", tmp_path / "refs"
    for i in range(6):
        write_case(source, name_of(i), flair_volume(i), seg_volume(i))
    normal = {name_of(i) for i in range(6) if i not in LESION_AT_SLICE}
    for shots in (1, 2):  # the second run takes one more reference out of the test split
        assert prepare(capsys, "--brats_dir", source, "--out", out, "--fewshot_out", refs, "--shots", shots)[0] == 0
        references = set(listing(refs / "brain" / "train" / "good"))
        assert len(references) == shots and set(listing(out / "brain" / "test" / "good")) == normal - references
    before = {p: p.read_bytes() for p in written_files(out) + written_files(refs)}
    calls, save = [], prepare_brats._save

    def disk_full(array, path, **options):  # the third file cannot be written
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        save(array, path, **options)

    monkeypatch.setattr(prepare_brats, "_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_brats.main(["--brats_dir", str(source), "--out", str(out), "--fewshot_out", str(refs), "--shots", "1"])
    after = {p: p.read_bytes() for p in written_files(out) + written_files(refs)}
    assert len(calls) == 3 and after == before and os.listdir(out) == ["brain"] and os.listdir(refs) == ["brain"]


# --------------------------------------------------------------------------- end to end

def tiny_mvtec(root) -> str:
    """The 15 MVTec AD classes, one smooth 64x64 normal training image each (MVTec layout)."""
    from datasets.registry import MVTEC_CLASSES
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for c in MVTEC_CLASSES:
        folder = root / c / "train" / "good"
        folder.mkdir(parents=True)
        texture = ndimage.gaussian_filter(rng.random((64, 64, 3)), sigma=(2, 2, 0))
        texture = (texture - texture.min()) / (texture.max() - texture.min())
        Image.fromarray((texture * 255).astype(np.uint8)).save(folder / "000.png")
    return str(root)


def test_prepared_split_runs_through_extraction_and_mvtec_to_brats(brats, tmp_path, capsys):
    import extract_ref_features
    import main as train_script
    from models.extractor import OFFLINE_BACKBONE

    refs, runs = tmp_path / "refs", tmp_path / "runs"
    code = run_cli(extract_ref_features.main, ["--dataset", "brats", "--few_shot_dir", str(brats["fewshot"]),
                                               "--save_dir", str(refs), "--backbone", OFFLINE_BACKBONE,
                                               "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((refs / "brain" / "meta.json").read_text())["num_shots"] == SHOTS
    argv = ["--setting", "mvtec_to_brats", "--train_dataset_dir", tiny_mvtec(tmp_path / "mvtec"),
            "--test_dataset_dir", str(brats["out"]), "--test_ref_feature_dir", str(refs), "--num_ref_shot", SHOTS,
            "--anomaly_source", "synthetic", "--backbone", OFFLINE_BACKBONE, "--epochs", 1, "--stage1_epochs", 0,
            "--train_ref_shot", 1, "--train_ref_pool", 1, "--batch_size", 15, "--eval_batch_size", 8, "--no_aupro",
            "--coupling_layers", 2, "--num_embeddings", 32, "--num_workers", 0, "--num_heatmaps", 0,
            "--device", "cpu", "--checkpoint_path", str(runs)]
    code = run_cli(train_script.main, [str(a) for a in argv])
    assert code == 0, capsys.readouterr().err
    run = runs / "mvtec_to_brats"
    table = pd.read_csv(run / "mvtec_to_brats_epoch1_metrics.csv")
    assert table["Class Name"].tolist() == ["brain", "Mean"] and 0 <= table["Image AUC"].iloc[0] <= 1
    tested = json.loads((run / "mvtec_to_brats_run.json").read_text())["datasets"]["test"]
    assert tested["dataset"] == "brats" and tested["test"] == {
        "brain": {"normal": 10 - len(LESION_AT_SLICE) - SHOTS, "anomalous": len(LESION_AT_SLICE)}}
