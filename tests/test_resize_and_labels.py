"""Data as it comes: ``--resize crop|full`` for non-square images, and folder classes labelled per image only."""
from __future__ import annotations

import csv
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import AnomalyDataset, Sample, custom_setting, evaluation_samples, mvtec
from datasets.anomaly_source import SyntheticAnomalyDataset, choose_anomaly_source
from datasets.resize import CropLoss, crop_loss, crop_losses, crop_window
from models.extractor import OFFLINE_BACKBONE
from utils.errors import UserError
from utils.formats import checkpoint, reference_features
from utils.metrics import compute_metrics

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def save(path, array) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def texture(seed: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box(width: int, height: int, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[top:bottom, left:right] = 255
    return mask


# ----------------------------------------------------------------------------- geometry

def test_full_resize_keeps_the_whole_image_and_mask(tmp_path):
    image = save(tmp_path / "img.png", texture(0, 60, 30))
    mask = save(tmp_path / "mask.png", box(60, 30, 0, 5, 8, 20))  # a defect on the left border
    full = AnomalyDataset([Sample(image, 1, (mask,), "c")], image_size=32, mean=ZERO, std=ONE, resize="full")[0]
    pil = Image.open(image).convert("RGB")
    expected = np.asarray(pil.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255
    assert np.allclose(full["image"].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    expected_mask = np.asarray(Image.open(mask).resize((32, 32), Image.Resampling.NEAREST)) > 0
    assert np.array_equal(full["mask"][0].numpy() > 0, expected_mask) and expected_mask.any()

    crop = AnomalyDataset([Sample(image, 1, (mask,), "c")], image_size=32, mean=ZERO, std=ONE)[0]
    wide = np.asarray(pil.resize((64, 32), Image.Resampling.BICUBIC), np.float32) / 255  # short side 30 -> 32
    assert np.allclose(crop["image"].permute(1, 2, 0).numpy(), wide[:, 16:48], atol=1e-6)
    assert not crop["mask"].any()  # the crop cut the whole defect off

    synthetic = SyntheticAnomalyDataset([Sample(image, 0, (), "c")], image_size=32, resize="full")
    assert np.array_equal(np.asarray(synthetic.geometry(pil)), np.asarray(pil.resize((32, 32), Image.Resampling.BICUBIC)))


def test_crop_window_matches_a_hand_computation_and_the_pipeline():
    # 300x200 at 224: the short side becomes 224, the long one int(224 * 1.5) = 336, the crop starts at 56;
    # in the image's own pixels (x 300/336) that is columns 50 to 250, every row.
    assert crop_window(300, 200, 224) == pytest.approx((50.0, 0.0, 250.0, 200.0))
    assert crop_window(200, 300, 224) == pytest.approx((0.0, 50.0, 200.0, 250.0))
    assert crop_window(512, 256, 224) == pytest.approx((128.0, 0.0, 384.0, 256.0))
    assert crop_window(64, 64, 224) == pytest.approx((0.0, 0.0, 64.0, 64.0))
    # the mask pipeline, fed an image whose pixels hold their own column index, sees exactly those columns
    columns = Image.fromarray(np.tile(np.arange(300, dtype=np.int32), (200, 1)), mode="I")
    seen = np.asarray(AnomalyDataset([], image_size=224).mask_transform(columns))
    assert seen.shape == (224, 224) and (seen.min(), seen.max()) == (50, 249)


def test_crop_loss_counts_the_defect_pixels_outside_the_window(tmp_path):
    # 300x200 keeps columns 50..249: a box over columns 40..59 loses its 10 left columns, one over 0..29 all
    assert crop_loss(box(300, 200, 40, 10, 60, 20) > 0, 224) == (100, 200)
    assert crop_loss(box(300, 200, 0, 0, 30, 10) > 0, 224) == (300, 300)
    assert crop_loss(box(300, 200, 100, 0, 200, 200) > 0, 224) == (0, 100 * 200)
    assert crop_loss(np.zeros((200, 300), bool), 224) == (0, 0)

    def sample(name, width, height, boxed, label=1):
        image = save(tmp_path / "test" / "bad" / f"{name}.png", texture(1, width, height))
        masks = (save(tmp_path / "gt" / f"{name}.png", box(width, height, *boxed)),) if label else ()
        return Sample(image, label, masks, "tile")

    samples = [sample("part", 300, 200, (40, 10, 60, 20)), sample("gone", 300, 200, (0, 0, 30, 10)),
               sample("kept", 300, 200, (100, 0, 200, 200)), sample("square", 64, 64, (0, 0, 4, 4)),
               sample("empty", 300, 200, (0, 0, 0, 0)), sample("normal", 300, 200, None, label=0)]
    loss = crop_losses(samples, 224, "tile")
    assert loss == CropLoss("tile", anomalous=5, partly=2, entirely=1)
    assert loss.message() == ("tile: the center crop removes annotated defect pixels from 2 of 5 anomalous images "
                              "(1 lose all of theirs); --resize full keeps the whole image")
    assert CropLoss("tile", 5, 0, 0).message() is None
    # "gone" loses everything in the pipeline too; "full" keeps it
    gone = [samples[1]]
    assert not AnomalyDataset(gone, image_size=224)[0]["mask"].any()
    assert AnomalyDataset(gone, image_size=224, resize="full")[0]["mask"].any()


# ----------------------------------------------------------------------------- records

def test_reference_features_refuse_another_resize_and_old_files_read_as_crop(tmp_path):
    wanted = {"backbone": OFFLINE_BACKBONE, "layers": [1, 2, 3], "amp": "none", "resize": "full"}
    for meta in ({"backbone": OFFLINE_BACKBONE, "layers": [1, 2, 3], "resize": "crop"},
                 {"backbone": OFFLINE_BACKBONE, "layers": [1, 2, 3]}):  # written before resize was recorded
        with pytest.raises(UserError, match=r"extracted with --resize crop, this run uses --resize full; "
                                            r"re-extract them with extract_ref_features.py --resize full"):
            reference_features.check_backbone(str(tmp_path), "c", meta, wanted)
        reference_features.check_backbone(str(tmp_path), "c", meta, dict(wanted, resize="crop"))
    reference_features.check_backbone(str(tmp_path), "c", dict(meta, resize="full"), wanted)


def test_checkpoints_record_resize_and_refuse_another():
    from datasets import get_setting
    from models.resad import ModelConfig

    extractor = SimpleNamespace(name=OFFLINE_BACKBONE, channels=[24, 40, 112], layers=[1, 2, 3], resize="full")
    record = checkpoint.trained_on(get_setting("demo"), extractor)
    assert record["resize"] == "full"
    state = {"format": checkpoint.CHECKPOINT_FORMAT, "trained_on": record, "model_config": ModelConfig().to_dict()}
    checkpoint.check_resume(state, "x.pth", "demo", extractor, ModelConfig())
    with pytest.raises(UserError, match=r"--resume x.pth: the model was trained with --resize full, this run uses "
                                        r"--resize crop; pass --resize full"):
        checkpoint.check_resume(state, "x.pth", "demo", SimpleNamespace(**dict(vars(extractor), resize="crop")),
                                ModelConfig())
    old = dict(state, trained_on={k: v for k, v in record.items() if k != "resize"})
    checkpoint.check_resize(old, "old.pth", "crop")
    with pytest.raises(UserError, match=r"--checkpoint old.pth: the model was trained with --resize crop"):
        checkpoint.check_resize(old, "old.pth", "full")


# ----------------------------------------------------------------------------- image labels only

def folder_tree(root, label_only=("nut",), masked=("tile",)) -> str:
    """``bolt`` (train only), label-only classes (32x32, no masks) and masked classes (64x32, defects on the
    left border, which the center crop cuts off)."""
    for i in range(2):
        save(root / "bolt" / "train" / "good" / f"{i:03d}.png", texture(i, 32, 32))
    for c in label_only:
        _class_images(root / c, seed=10, width=32, defect=(slice(8, 24), slice(8, 24)))
    for c in masked:
        _class_images(root / c, seed=40, width=64, defect=(slice(4, 28), slice(0, 10)))
        for i in range(2):
            save(root / c / "ground_truth" / "crack" / f"{i:03d}_mask.png", box(64, 32, 0, 4, 10, 28))
    return str(root)


def _class_images(folder, seed: int, width: int, defect) -> None:
    """Two train/good, two test/good and two test/crack images (``width`` x 32; the crack a white
    ``defect`` region) of one class."""
    for i in range(2):
        save(folder / "train" / "good" / f"{i:03d}.png", texture(seed + i, width, 32))
        save(folder / "test" / "good" / f"{i:03d}.png", texture(seed + 10 + i, width, 32))
        bad = texture(seed + 20 + i, width, 32)
        bad[defect] = 255
        save(folder / "test" / "crack" / f"{i:03d}.png", bad)


def test_a_mix_of_masked_and_unmasked_images_names_the_first_without(tmp_path):
    root = folder_tree(tmp_path / "mine")
    samples = evaluation_samples("folder", root, "nut")
    assert [s.label for s in samples] == [1, 1, 0, 0] and not any(s.masks for s in samples)
    os.remove(os.path.join(root, "tile", "ground_truth", "crack", "001_mask.png"))
    image = os.path.join(root, "tile", "test", "crack", "001.png")
    with pytest.raises(UserError, match=rf"^no ground-truth mask for {re.escape(image)} \(expected .*001_mask.png\), but 1 "
                                        r"other anomalous images of class 'tile' have masks"):
        evaluation_samples("folder", root, "tile")
    with pytest.raises(UserError, match="no ground-truth mask for"):  # only the user's own folders are lenient
        mvtec.list_samples(root, "nut", "test")


def test_label_only_source_trains_on_synthetic_anomalies(tmp_path, capsys):
    root = folder_tree(tmp_path / "mine", masked=())
    setting = custom_setting("folder", "folder", ["nut"], ["bolt"], root, root)
    chosen, samples = choose_anomaly_source(None, setting, root)
    assert chosen == "synthetic" and not any(s.label for s in samples)
    assert "stage-2 anomalies: synthetic (the source's anomalous test images have no pixel masks" in \
        capsys.readouterr().out
    with pytest.raises(UserError, match=r"--anomaly_source real: anomalous test images of the seen classes have "
                                        r"no pixel masks \(e.g. .*crack.000.png\); use --anomaly_source synthetic"):
        choose_anomaly_source("real", setting, root)


def test_metrics_without_anomalous_pixels_are_image_metrics_only():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 16, 16)).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((6, 16, 16), bool)
    masks[3:, 4:8, 4:8] = True
    with_masks, without = compute_metrics(maps, labels, masks), compute_metrics(maps, labels, np.zeros_like(masks))
    image = [m for m in with_masks if m.startswith("Image")]
    assert all(np.isfinite(with_masks[m]) for m in with_masks)
    assert [without[m] for m in image] == [with_masks[m] for m in image]
    assert all(np.isnan(without[m]) for m in without if m.startswith("Pixel"))
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(maps, labels, np.zeros_like(masks))


def test_heatmaps_of_label_only_classes_have_no_outline(tmp_path, monkeypatch):
    import matplotlib.axes

    from utils.report.plots import save_heatmap
    from utils.run.evaluation import _failure_heatmaps

    contours = []
    monkeypatch.setattr(matplotlib.axes.Axes, "contour", lambda self, *a, **k: contours.append(a))
    mask, image = np.zeros((8, 8), bool), np.zeros((8, 8, 3))
    mask[2:4, 2:4] = True
    save_heatmap(str(tmp_path / "a.png"), image, mask, np.random.rand(8, 8), 1)
    assert len(contours) == 1
    save_heatmap(str(tmp_path / "b.png"), image, mask, np.random.rand(8, 8), 1, pixel_labels=False)
    assert len(contours) == 1 and os.path.isfile(tmp_path / "b.png")

    root = folder_tree(tmp_path / "mine", masked=())
    samples = evaluation_samples("folder", root, "nut")
    extractor = SimpleNamespace(image_size=16, mean=ZERO, std=ONE, resize="crop")
    items = _failure_heatmaps(samples, np.random.rand(4, 16, 16).astype(np.float32), np.array([1, 1, 0, 0]),
                              np.zeros((4, 16, 16), bool), extractor, 3)
    assert items and all(item["pixel_labels"] is False for item in items)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    from models.extractor import build_extractor, set_resize
    from utils.run.extraction import extract_reference_features

    base = tmp_path_factory.mktemp("own")
    root = folder_tree(base / "mine")
    extractor = build_extractor(OFFLINE_BACKBONE)
    refs = {}
    for resize in ("crop", "full"):
        refs[resize] = str(base / f"refs_{resize}")
        extract_reference_features("folder", root, refs[resize], set_resize(extractor, resize), shots=2,
                                   classes=["nut", "tile"])
    return dict(base=base, root=root, extractor=extractor, refs=refs)


def knn_args(own_data, resize, refs, out, *extra):
    from tests.test_own_data import small_args

    return small_args("--setting", "custom", "--source_dataset", "folder", "--train_dataset_dir", own_data["root"],
                      "--seen_classes", "bolt", "--target_dataset", "folder", "--test_dataset_dir", own_data["root"],
                      "--unseen_classes", "nut", "tile", "--test_ref_feature_dir", refs, "--num_ref_shot", "2",
                      "--baseline", "knn", "--resize", resize, "--checkpoint_path", str(out), *extra)


def test_label_only_class_gets_empty_pixel_cells_and_full_keeps_the_border_defects(own_data, capsys):
    from tests.run_helpers import fit

    with open(os.path.join(own_data["refs"]["full"], "tile", "meta.json")) as f:
        assert json.load(f)["resize"] == "full"
    values = {}
    for resize in ("crop", "full"):
        out = own_data["base"] / f"out_{resize}"
        fit(knn_args(own_data, resize, own_data["refs"][resize], out), [2], {2: "custom"}, own_data["extractor"])
        printed = capsys.readouterr().out
        assert printed.count("nut: its anomalous test images have no pixel masks, so it is evaluated on image "
                             "metrics only") == 1
        warned = "warning: tile: the center crop removes annotated defect pixels from 2 of 2 anomalous images " \
                 "(2 lose all of theirs)"
        assert (warned in printed) == (resize == "crop")
        with open(out / "custom" / "custom_baseline.csv") as f:   # the raw baseline's rows (Map "knn")
            rows = {row["Class Name"]: row for row in csv.DictReader(f) if row["Map"] == "knn"}
        with open(out / "custom" / "custom_baseline.json") as f:
            classes = json.load(f)["classes"]
        pixel = ["Pixel AUC", "Pixel AP", "Pixel F1", "Pixel AUPRO"]
        assert all(rows["nut"][m] == "" and classes["nut"][m] is None for m in pixel)
        assert all(rows[c]["Image AUC"] != "" for c in ("nut", "tile", "Mean"))
        # the crop leaves the tile's defects no pixel in view; full keeps them, so pixel metrics exist
        assert all((rows["tile"][m] == "") == (resize == "crop") for m in pixel)
        values[resize] = rows
    assert values["full"]["Mean"]["Pixel AUC"] == values["full"]["tile"]["Pixel AUC"]


def test_runs_refuse_references_and_checkpoints_of_another_resize(own_data, tmp_path):
    from tests.run_helpers import fit

    with pytest.raises(UserError, match=r"--test_ref_feature_dir .*nut: features were extracted with --resize "
                                        r"crop, this run uses --resize full"):
        fit(knn_args(own_data, "full", own_data["refs"]["crop"], tmp_path / "out"), [2], {2: "custom"})
    record = {"setting": "custom", "source": "folder", "seen_classes": ["bolt"], "backbone": OFFLINE_BACKBONE,
              "channels": [24, 40, 112], "layers": [1, 2, 3], "feature_levels": 3, "resize": "full"}
    path = str(tmp_path / "full.pth")
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": {}, "model_config": {}, "trained_on": record}, path)
    args = knn_args(own_data, "crop", own_data["refs"]["crop"], tmp_path / "out")
    args.baseline, args.eval_only, args.checkpoint = None, True, path
    with pytest.raises(UserError, match=rf"--checkpoint {path}: the model was trained with --resize full, this run "
                                        r"uses --resize crop; pass --resize full"):
        fit(args, [2], {2: "custom"})
    assert not os.path.exists(tmp_path / "out")
