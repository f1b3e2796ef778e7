"""Tests of the datasets package: every layout on tiny fake trees, image reading,
pre-processing, validation messages, the registry and the synthetic demo data."""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import (DATASETS, DEMO_SEEN, DEMO_UNSEEN, SETTINGS, AnomalyDataset, Sample,
                      brats, btad, detect_layout, generate_demo_dataset, get_dataset,
                      get_setting, list_fewshot_images, mpdd, mvtec, mvtec3d, mvtecloco,
                      read_image, registry, visa)
from datasets import demo as synthetic
from utils.errors import UserError

FEWSHOT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                            "data", "fewshot")


# ----------------------------------------------------------------------------- fake trees

def save(path, image=None, size=(32, 32), value=128) -> str:
    """Write an image file (creating folders); a flat RGB image by default."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if image is None:
        image = Image.new("RGB", size, (value, value, value))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path)
    return path


def box_mask(size=(32, 32), box=(4, 4, 12, 12)) -> Image.Image:
    """A 0/255 mask with a white rectangle (left, top, right, bottom; right/bottom exclusive)."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


@pytest.fixture
def mvtec_root(tmp_path):
    root = tmp_path / "mvtec"
    for name in ("000", "001"):
        save(root / "bottle/train/good" / f"{name}.png")
    (root / "bottle/train/good/.DS_Store").write_text("x")
    (root / "bottle/train/good/readme.txt").write_text("x")
    save(root / "bottle/test/good/000.png")
    for name in ("001", "000"):
        save(root / "bottle/test/crack" / f"{name}.png")
        save(root / "bottle/ground_truth/crack" / f"{name}_mask.png", box_mask())
    return str(root)


@pytest.fixture
def btad_root(tmp_path):
    root = tmp_path / "btad"
    save(root / "01/train/ok/0000.bmp")
    save(root / "01/test/ok/0000.bmp")
    save(root / "01/test/ko/0001.bmp")
    save(root / "01/ground_truth/ko/0001.png", box_mask())
    return str(root)


@pytest.fixture
def visa_root(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for split, name in (("train", "0001"), ("train", "0000"), ("test", "0002")):
        image = f"candle/Data/Images/Normal/{name}.JPG"
        save(root / image)
        rows.append(f"candle,{split},normal,{image},")
    image, mask = "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"
    save(root / image)
    save(root / mask, box_mask())
    rows.append(f"candle,test,anomaly,{image},{mask}")
    save(root / "pcb1/Data/Images/Normal/0000.JPG")
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir()
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return str(root)


@pytest.fixture
def mvtec3d_root(tmp_path):
    root = tmp_path / "mvtec3d"
    save(root / "bagel/train/good/rgb/000.png")
    save(root / "bagel/train/good/xyz/000.tiff")
    save(root / "bagel/test/good/rgb/000.png")
    save(root / "bagel/test/good/gt/000.png", box_mask(box=(0, 0, 0, 0)))
    save(root / "bagel/test/crack/rgb/000.png")
    save(root / "bagel/test/crack/gt/000.png", box_mask())
    return str(root)


@pytest.fixture
def loco_root(tmp_path):
    root = tmp_path / "loco"
    save(root / "breakfast_box/train/good/000.png")
    save(root / "breakfast_box/test/good/000.png")
    save(root / "breakfast_box/test/logical_anomalies/000.png")
    save(root / "breakfast_box/ground_truth/logical_anomalies/000/000.png", box_mask(box=(0, 0, 8, 8)))
    save(root / "breakfast_box/ground_truth/logical_anomalies/000/001.png", box_mask(box=(20, 20, 32, 32)))
    return str(root)


@pytest.fixture
def brats_root(tmp_path):
    root = tmp_path / "brats"
    save(root / "brain/test/good/00.jpg")
    save(root / "brain/test/lesion/01.jpg")
    save(root / "brain/ground_truth/lesion/01_mask.png", box_mask())
    return str(root)


# ----------------------------------------------------------------------------- layouts

def test_mvtec_lists_sorted_samples_with_masks(mvtec_root):
    train = mvtec.list_samples(mvtec_root, "bottle", "train")
    assert [os.path.basename(s.image) for s in train] == ["000.png", "001.png"]
    assert all(s.label == 0 and s.masks == () and s.class_name == "bottle" for s in train)

    test = mvtec.list_samples(mvtec_root, "bottle", "test")
    assert [(s.image.split("/test/")[1], s.label) for s in test] == [
        ("crack/000.png", 1), ("crack/001.png", 1), ("good/000.png", 0)]
    assert test[0].masks == (os.path.join(mvtec_root, "bottle/ground_truth/crack/000_mask.png"),)
    assert test[2].masks == ()
    assert mpdd.list_samples(mvtec_root, "bottle", "test") == test


def test_btad_mask_found_by_stem_with_another_extension(btad_root):
    assert len(btad.list_samples(btad_root, "01", "train")) == 1
    test = btad.list_samples(btad_root, "01", "test")
    assert [(os.path.basename(s.image), s.label) for s in test] == [("0001.bmp", 1), ("0000.bmp", 0)]
    assert test[0].masks == (os.path.join(btad_root, "01/ground_truth/ko/0001.png"),)


def test_visa_reads_split_csv(visa_root):
    train = visa.list_samples(visa_root, "candle", "train")
    assert [os.path.basename(s.image) for s in train] == ["0000.JPG", "0001.JPG"]
    test = visa.list_samples(visa_root, "candle", "test")
    assert [(os.path.basename(s.image), s.label) for s in test] == [("000.JPG", 1), ("0002.JPG", 0)]
    assert test[0].masks == (os.path.join(visa_root, "candle/Data/Masks/Anomaly/000.png"),)
    assert test[1].masks == ()


def test_mvtec3d_reads_rgb_and_gt(mvtec3d_root):
    assert [s.image for s in mvtec3d.list_samples(mvtec3d_root, "bagel", "train")] == [
        os.path.join(mvtec3d_root, "bagel/train/good/rgb/000.png")]
    test = mvtec3d.list_samples(mvtec3d_root, "bagel", "test")
    assert [(s.image.split("/test/")[1], s.label) for s in test] == [
        ("crack/rgb/000.png", 1), ("good/rgb/000.png", 0)]
    assert test[0].masks == (os.path.join(mvtec3d_root, "bagel/test/crack/gt/000.png"),)


def test_loco_mask_is_the_union_of_a_folder(loco_root):
    test = mvtecloco.list_samples(loco_root, "breakfast_box", "test")
    anomalous = [s for s in test if s.label == 1]
    assert len(anomalous) == 1 and len(anomalous[0].masks) == 2
    mask = AnomalyDataset(anomalous, image_size=32)[0]["mask"][0]
    expected = torch.zeros(32, 32)
    expected[0:8, 0:8] = 1
    expected[20:32, 20:32] = 1
    assert torch.equal(mask, expected)


def test_brats_test_only(brats_root):
    test = brats.list_samples(brats_root, "brain", "test")
    assert [(os.path.basename(s.image), s.label) for s in test] == [("00.jpg", 0), ("01.jpg", 1)]
    assert test[1].masks == (os.path.join(brats_root, "brain/ground_truth/lesion/01_mask.png"),)
    with pytest.raises(UserError, match="BraTS has no training split"):
        brats.list_samples(brats_root, "brain", "train")


def test_fewshot_mixed_extensions(tmp_path):
    folder = tmp_path / "shots/cls/train/good"
    for name in ("d.bmp", "a.png", "c.JPG", "b.jpeg", "e.TIF"):
        save(folder / name)
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden.png").write_text("x")
    images = list_fewshot_images(str(tmp_path / "shots"), "cls")
    assert [os.path.basename(p) for p in images] == ["a.png", "b.jpeg", "c.JPG", "d.bmp", "e.TIF"]
    assert list_fewshot_images(str(tmp_path / "shots"), "cls", max_shots=2) == images[:2]
    with pytest.raises(UserError, match="holds 5 reference images but 8 are needed"):
        list_fewshot_images(str(tmp_path / "shots"), "cls", max_shots=8)
    with pytest.raises(UserError, match=r"few-shot folder .*other/train/good not found.*--few_shot_dir"):
        list_fewshot_images(str(tmp_path / "shots"), "other")
    (tmp_path / "shots/empty/train/good").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        list_fewshot_images(str(tmp_path / "shots"), "empty")


@pytest.mark.skipif(not os.path.isdir(FEWSHOT_DATA), reason="shared few-shot data not present")
def test_fewshot_real_reference_folders():
    for class_name in registry.MVTEC_CLASSES:
        images = list_fewshot_images(os.path.join(FEWSHOT_DATA, "mvtec"), class_name, max_shots=4)
        assert len(images) == 4 and images == sorted(images)
    bmps = list_fewshot_images(os.path.join(FEWSHOT_DATA, "btad"), "03")
    assert bmps and all(p.endswith(".bmp") for p in bmps)
    item = AnomalyDataset([Sample(bmps[0], 0, (), "03")])[0]
    assert item["image"].shape == (3, 224, 224)


# ----------------------------------------------------------------------------- reading and pre-processing

def _reference_preprocess(image: Image.Image, size: int, resample) -> np.ndarray:
    """Short side to ``size`` (long side truncated), center crop, as an array."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    resized = np.asarray(image.resize(new, resample))
    top, left = int(round((new[1] - size) / 2)), int(round((new[0] - size) / 2))
    return resized[top:top + size, left:left + size]


@pytest.mark.parametrize("width,height", [(40, 30), (30, 47), (24, 24)])
def test_preprocessing_matches_pil_resize_and_crop(tmp_path, width, height):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = save(tmp_path / "img.png", pixels)
    mask = np.zeros((height, width), np.uint8)
    mask[5:17, 3:20] = 255
    mask_path = save(tmp_path / "mask.png", mask)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    item = AnomalyDataset([Sample(image, 1, (mask_path,), "c")], image_size=16, mean=mean, std=std)[0]

    expected = _reference_preprocess(Image.fromarray(pixels), 16, Image.Resampling.BICUBIC) / 255.0
    expected = (expected - np.array(mean)) / np.array(std)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
    np.testing.assert_allclose(item["image"].numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    expected_mask = _reference_preprocess(Image.fromarray(mask), 16, Image.Resampling.NEAREST) > 0
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 16, 16)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(item["mask"][0].numpy(), expected_mask.astype(np.float32))
    assert (item["label"], item["class_name"], item["path"]) == (1, "c", image)


def test_dataset_defaults_and_dataloader(mvtec_root):
    samples = mvtec.list_samples(mvtec_root, "bottle", "test")
    dataset = AnomalyDataset(samples)
    normal = dataset[2]
    assert normal["image"].shape == (3, 224, 224) and normal["mask"].shape == (1, 224, 224)
    assert normal["mask"].sum() == 0 and normal["label"] == 0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(normal["image"], (128 / 255 - mean) / std, atol=1e-5)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 224, 224) and batch["label"].tolist() == [1, 1, 0]
    assert batch["mask"][0].sum() > 0


def test_unusual_image_modes_load_as_rgb(tmp_path):
    grey = save(tmp_path / "grey.png", Image.new("L", (8, 8), 77))
    rgba = save(tmp_path / "rgba.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0)))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette = save(tmp_path / "palette.png", palette)
    deep = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    deep_png = save(tmp_path / "deep.png", Image.fromarray(deep))
    deep_tif = save(tmp_path / "deep.tif", Image.fromarray(deep))

    assert np.asarray(read_image(grey)).tolist()[0][0] == [77, 77, 77]
    assert np.asarray(read_image(rgba))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(read_image(palette))[0, 0].tolist() == [200, 100, 50]
    for path in (deep_png, deep_tif):
        image = read_image(path)
        assert image.mode == "RGB"
        assert np.asarray(image)[..., 0].tolist() == [[0, 255], [128, 1]]
    wide = Image.fromarray(np.array([[65535, 0]], dtype=np.int32))  # mode "I"
    assert wide.mode == "I"
    from datasets.image_io import to_rgb
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [255, 0]


def test_sixteen_bit_mask_with_small_labels_is_kept(tmp_path):
    image = save(tmp_path / "img.png")
    labels = np.zeros((32, 32), np.uint16)
    labels[0:4, 0:4] = 1
    mask = save(tmp_path / "mask.png", Image.fromarray(labels))
    item = AnomalyDataset([Sample(image, 1, (mask,), "c")], image_size=32)[0]
    assert item["mask"].sum() == 16


@pytest.mark.parametrize("name", ["broken.png", "broken.jpg"])
def test_truncated_image_is_a_user_error(tmp_path, name):
    path = save(tmp_path / name, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = open(path, "rb").read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"cannot read image {path}: file is truncated or not an image"):
        read_image(path)
    with pytest.raises(UserError, match="replace or remove it"):
        AnomalyDataset([Sample(path, 0, (), "c")])[0]


def test_non_image_file_and_missing_file(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(UserError, match=f"cannot read image {fake}"):
        read_image(str(fake))
    with pytest.raises(UserError, match="not found"):
        read_image(str(tmp_path / "missing.png"))


def test_mask_of_another_size_is_resized_with_one_warning(tmp_path):
    image = save(tmp_path / "img.png", size=(32, 32))
    mask = save(tmp_path / "small_mask.png", box_mask(size=(16, 16), box=(0, 0, 8, 8)))
    dataset = AnomalyDataset([Sample(image, 1, (mask,), "c")], image_size=32)
    with pytest.warns(UserWarning, match="small_mask.png is 16x16 but its image is 32x32"):
        item = dataset[0]
    expected = torch.zeros(32, 32)
    expected[:16, :16] = 1
    assert torch.equal(item["mask"][0], expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset[0]
    assert not caught


# ----------------------------------------------------------------------------- validation

def test_missing_and_empty_root(tmp_path):
    with pytest.raises(UserError, match=r"dataset root .*nowhere does not exist; check --train_dataset_dir"):
        registry.training_samples("mvtec", str(tmp_path / "nowhere"), ["bottle"], stage=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"dataset root .*empty is empty; .*check --test_dataset_dir"):
        registry.evaluation_samples("mvtec", str(tmp_path / "empty"), "bottle")


def test_missing_class(mvtec_root):
    expected = os.path.join(mvtec_root, "cable", "train", "good")
    message = (f"class 'cable' not found under {mvtec_root} (expected {expected}); "
               f"check --train_dataset_dir")
    with pytest.raises(UserError) as error:
        registry.training_samples("mvtec", mvtec_root, ["bottle", "cable"], stage=1)
    assert str(error.value) == message


def test_visa_unknown_class(visa_root):
    with pytest.raises(UserError, match=r"class 'bagel' not found in .*split_csv/1cls.csv; check"):
        visa.list_samples(visa_root, "bagel", "test")
    with pytest.raises(UserError, match="no test images for class 'pcb1'"):
        visa.list_samples(visa_root, "pcb1", "test")


@pytest.mark.parametrize("fixture,found", [("visa_root", "VisA"), ("btad_root", "BTAD"),
                                           ("mvtec3d_root", "MVTec 3D-AD"),
                                           ("loco_root", "MVTec LOCO")])
def test_layout_mismatch_names_both_layouts(request, fixture, found):
    root = request.getfixturevalue(fixture)
    with pytest.raises(UserError, match=rf"has the {found} layout \(found .*\) but MVTec AD was "
                                        r"expected \(<cls>/train/good.*\); check --test_dataset_dir"):
        registry.evaluation_samples("mvtec", root, "bottle")


def test_mvtec_root_given_to_visa_and_btad(mvtec_root):
    with pytest.raises(UserError, match="has the MVTec AD / MPDD layout .* but VisA was expected"):
        visa.list_samples(mvtec_root, "candle", "test")
    with pytest.raises(UserError, match="has the MVTec AD / MPDD layout .* but BTAD was expected"):
        btad.list_samples(mvtec_root, "01", "train")


def test_single_class_folder_given_as_root(mvtec_root):
    with pytest.raises(UserError, match=r"bottle is a single class folder \(MVTec AD / MPDD layout\); pass the folder"):
        mvtec.list_samples(os.path.join(mvtec_root, "bottle"), "bottle", "train")


def test_fewshot_folder_given_as_dataset_root(tmp_path):
    save(tmp_path / "shots/bottle/train/good/000.png")
    with pytest.raises(UserError, match="has the few-shot reference layout .* but MVTec AD was expected"):
        mvtec.list_samples(str(tmp_path / "shots"), "bottle", "test")


def test_anomalous_image_without_mask(mvtec_root):
    os.remove(os.path.join(mvtec_root, "bottle/ground_truth/crack/000_mask.png"))
    image = os.path.join(mvtec_root, "bottle/test/crack/000.png")
    expected = os.path.join(mvtec_root, "bottle/ground_truth/crack/000_mask.png")
    with pytest.raises(UserError) as error:
        mvtec.list_samples(mvtec_root, "bottle", "test")
    assert str(error.value) == (f"no ground-truth mask for {image} (expected {expected}); "
                                f"add the mask or remove the image")


def test_btad_and_visa_missing_masks(btad_root, visa_root):
    os.remove(os.path.join(btad_root, "01/ground_truth/ko/0001.png"))
    with pytest.raises(UserError, match=r"no ground-truth mask for .*0001.bmp \(expected .*ko/0001\.\*\)"):
        btad.list_samples(btad_root, "01", "test")
    os.remove(os.path.join(visa_root, "candle/Data/Masks/Anomaly/000.png"))
    with pytest.raises(UserError, match="no ground-truth mask for .*000.JPG"):
        visa.list_samples(visa_root, "candle", "test")


def test_class_without_images(mvtec_root):
    for name in ("000.png", "001.png"):
        os.remove(os.path.join(mvtec_root, "bottle/train/good", name))
    with pytest.raises(UserError, match=r"no train images for class 'bottle' in .*bottle/train/good"):
        mvtec.list_samples(mvtec_root, "bottle", "train")


def test_detect_layout(mvtec_root, visa_root, btad_root, mvtec3d_root, loco_root, brats_root, tmp_path):
    assert detect_layout(mvtec_root) == "mvtec"
    assert detect_layout(visa_root) == "visa"
    assert detect_layout(btad_root) == "btad"
    assert detect_layout(mvtec3d_root) == "mvtec3d"
    assert detect_layout(loco_root) == "mvtecloco"
    assert detect_layout(brats_root) == "brats"
    save(tmp_path / "shots/x/train/good/0.png")
    assert detect_layout(str(tmp_path / "shots")) == "fewshot"
    (tmp_path / "other/stuff").mkdir(parents=True)
    assert detect_layout(str(tmp_path / "other")) is None
    if os.path.isdir(FEWSHOT_DATA):
        assert detect_layout(os.path.join(FEWSHOT_DATA, "mvtec3d")) == "fewshot"


# ----------------------------------------------------------------------------- registry

def test_settings_refer_to_known_classes():
    assert set(SETTINGS) == {"visa_to_mvtec", "mvtec_to_visa", "mvtec_to_btad", "mvtec_to_mvtec3d",
                             "mvtec_to_mpdd", "mvtec_to_mvtecloco", "mvtec_to_brats", "demo"}
    for setting in SETTINGS.values():
        assert setting.seen_classes and setting.unseen_classes
        assert set(setting.seen_classes) <= set(DATASETS[setting.source].classes)
        assert set(setting.unseen_classes) <= set(DATASETS[setting.target].classes)
    assert get_setting("mvtec_to_visa").unseen_classes == get_dataset("visa").classes
    assert len(get_dataset("mvtec").classes) == 15 and len(get_dataset("visa").classes) == 12
    assert get_dataset("mpdd").title == "MPDD" and "ground_truth" in get_dataset("mvtec").layout_description
    assert set(DEMO_SEEN).isdisjoint(DEMO_UNSEEN)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match="unknown setting 'nope' .*choose one of visa_to_mvtec, "):
        get_setting("nope")
    with pytest.raises(UserError, match="unknown dataset 'nope'; choose one of mvtec, visa"):
        get_dataset("nope")
    with pytest.raises(UserError, match="unknown MVTec AD class"):
        registry.evaluation_samples("mvtec", "/x", "bagel")


def test_training_samples_stages(mvtec_root):
    stage1 = registry.training_samples("mvtec", mvtec_root, ["bottle"], stage=1)
    stage2 = registry.training_samples("mvtec", mvtec_root, ["bottle"], stage=2)
    assert [s.label for s in stage1] == [0, 0]
    assert stage2[:2] == stage1
    assert stage2[2:] == registry.evaluation_samples("mvtec", mvtec_root, "bottle")
    assert sum(s.label for s in stage2) == 2 and all(s.masks for s in stage2 if s.label)


# ----------------------------------------------------------------------------- synthetic demo

@pytest.mark.slow
def test_demo_dataset_full_size(tmp_path):
    root = generate_demo_dataset(str(tmp_path / "demo"), seed=0)  # its time: a benchmark's business, not a test's
    for class_name in DEMO_SEEN + DEMO_UNSEEN:
        train = mvtec.list_samples(root, class_name, "train")
        test = synthetic.list_samples(root, class_name, "test")
        assert len(train) == 24 and len(test) == 20 and sum(s.label for s in test) == 12
        types = {os.path.basename(os.path.dirname(s.image)) for s in test if s.label}
        assert 2 <= len(types) <= 3
        for sample in test:
            mask = np.asarray(Image.open(sample.masks[0])) if sample.masks else None
            if sample.label:
                assert set(np.unique(mask)) == {0, 255} and 0.005 <= (mask > 0).mean() <= 0.12
        image = Image.open(train[0].image)
        assert image.size == (256, 256) and image.mode == "RGB"
    assert registry.training_samples("demo", root, DEMO_SEEN, stage=1)
    assert list_fewshot_images(root, DEMO_UNSEEN[0], max_shots=4)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_demo_dataset_through_anomaly_dataset(tmp_path):
    root = generate_demo_dataset(str(tmp_path / "demo"), n_train=1, n_test_good=1, n_test_anomalous=3)
    dataset = AnomalyDataset(registry.evaluation_samples("demo", root, "pill"))
    for item in dataset:
        assert (item["mask"].sum() > 0) == bool(item["label"])


def test_demo_dataset_is_deterministic(tmp_path):
    small = dict(n_train=2, n_test_good=1, n_test_anomalous=3)
    first = generate_demo_dataset(str(tmp_path / "a"), seed=5, **small)
    second = generate_demo_dataset(str(tmp_path / "b"), seed=5, **small)
    other = generate_demo_dataset(str(tmp_path / "c"), seed=6, **small)
    for relative in ("nut/train/good/001.png", "stripes/ground_truth/stain/000_mask.png"):
        data = open(os.path.join(first, relative), "rb").read()
        assert data == open(os.path.join(second, relative), "rb").read()
        assert data != open(os.path.join(other, relative), "rb").read()
    normals = [np.asarray(Image.open(os.path.join(first, f"checker/train/good/00{i}.png"))) for i in (0, 1)]
    assert not np.array_equal(*normals)


def test_demo_dataset_reuse_and_regeneration(tmp_path):
    small = dict(n_train=1, n_test_good=1, n_test_anomalous=2)
    root = str(tmp_path / "demo")
    generate_demo_dataset(root, **small)
    probe = os.path.join(root, "nut/train/good/000.png")
    os.utime(probe, ns=(1, 1))
    generate_demo_dataset(root, **small)  # reused: untouched
    assert os.stat(probe).st_mtime_ns == 1

    os.remove(os.path.join(root, synthetic.MARKER))  # looks interrupted: regenerated
    generate_demo_dataset(root, **small)
    assert os.stat(probe).st_mtime_ns != 1 and os.path.isfile(os.path.join(root, synthetic.MARKER))

    generate_demo_dataset(root, seed=1, **small)  # other parameters: regenerated
    assert '"seed": 1' in open(os.path.join(root, synthetic.MARKER)).read()
    assert not [name for name in os.listdir(tmp_path) if name != "demo"]


def test_demo_dataset_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/thesis.tex").write_text("x")
    with pytest.raises(UserError, match="holds files that are not a synthetic demo dataset"):
        generate_demo_dataset(str(tmp_path / "mine"), n_train=1, n_test_good=1, n_test_anomalous=2)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]
