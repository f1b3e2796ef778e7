"""Feature extractors: offline weights, local checkpoints, clear errors, reference features on real images."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from datasets import AnomalyDataset, Sample, list_fewshot_images
from models.extractor import OFFLINE_BACKBONE, _efficientnet_lite0_state_dict, build_extractor, set_amp
from utils.run.extraction import extract_reference_features
from utils.errors import UserError
from utils.formats.reference_features import load_bank as load_reference_bank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEWSHOT = os.path.join(REPO, "..", "shared", "data", "fewshot")
needs_fewshot = pytest.mark.skipif(not os.path.isdir(FEWSHOT), reason="../shared/data/fewshot not present")


@pytest.fixture(scope="module")
def extractor():
    return build_extractor(OFFLINE_BACKBONE)


def test_offline_backbone_levels(extractor):
    assert extractor.channels == [24, 40, 112]
    assert extractor.feature_sizes == [(56, 56), (28, 28), (14, 14)]
    feats = extractor(torch.zeros(2, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 56, 56), (2, 40, 28, 28), (2, 112, 14, 14)]
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.model.training  # frozen: BatchNorm never switches to training mode


@needs_fewshot
def test_offline_weights_are_imagenet_weights(extractor):
    # The positional mapping is right iff the full classifier recognises an MVTec screw as "screw" (783).
    full = timm.create_model(OFFLINE_BACKBONE, pretrained=False).eval()
    full.load_state_dict(_efficientnet_lite0_state_dict(full))
    path = list_fewshot_images(os.path.join(FEWSHOT, "mvtec"), "screw")[0]
    image = AnomalyDataset([Sample(path, 0, (), "screw")])[0]["image"]
    with torch.no_grad():
        probs = full(image[None]).softmax(-1)[0]
    assert probs.argmax().item() == 783 and probs.max().item() > 0.5
    # and the features-only model carries the same weights
    assert torch.equal(extractor.model.conv_stem.weight, full.conv_stem.weight)


def test_backbone_weights_file_for_any_timm_cnn(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    ext = build_extractor("resnet18", weights=str(path))
    assert ext.channels == [64, 128, 256] and ext.feature_sizes == [(56, 56), (28, 28), (14, 14)]
    assert torch.equal(ext.model.layer1[0].conv1.weight, full.layer1[0].conv1.weight)


def test_bad_backbone_inputs(tmp_path):
    with pytest.raises(UserError, match="unknown timm model"):
        build_extractor("no_such_net")
    with pytest.raises(UserError, match="file not found"):
        build_extractor("resnet18", weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="--backbone_weights"):
        build_extractor("resnet18", weights=str(junk))


@pytest.mark.slow
def test_no_network_message_names_the_ways_out(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    good = tmp_path / "fewshot" / "bottle" / "train" / "good"  # valid inputs: the paths are checked first
    good.mkdir(parents=True)
    Image.new("RGB", (32, 32), (120, 60, 30)).save(good / "000.png")
    proc = subprocess.run([sys.executable, "extract_ref_features.py", "--dataset", "mvtec", "--few_shot_dir",
                           str(tmp_path / "fewshot"), "--classes", "bottle", "--save_dir", str(tmp_path / "out"),
                           "--backbone", "wide_resnet50_2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1
    assert "--backbone_weights" in lines[0] and OFFLINE_BACKBONE in lines[0]
    assert not (tmp_path / "out").exists()


@needs_fewshot
def test_reference_features_of_real_images_are_image_major(tmp_path, extractor):
    root = os.path.join(FEWSHOT, "mvtec")
    written = extract_reference_features("mvtec", root, str(tmp_path), extractor, shots=3,
                                         classes=["bottle", "screw"], batch_size=2)
    assert sorted(written) == ["bottle", "screw"]
    files = list_fewshot_images(root, "screw", 3)
    for level, (c, hw) in enumerate([(24, 56 * 56), (40, 28 * 28), (112, 14 * 14)], start=1):
        rows = np.load(tmp_path / "screw" / f"layer{level}.npy")
        assert rows.dtype == np.float32 and rows.shape == (3 * hw, c)
    meta = json.loads((tmp_path / "screw" / "meta.json").read_text())
    assert meta["backbone"] == OFFLINE_BACKBONE and meta["num_shots"] == 3 and len(meta["images"]) == 3
    # rows of image 2 are exactly its own features, in row-major order
    second = AnomalyDataset([Sample(files[1], 0, (), "screw")])[0]["image"][None]
    feats = extractor(second)
    layer2 = np.load(tmp_path / "screw" / "layer2.npy")
    expected = feats[1][0].permute(1, 2, 0).reshape(-1, 40).numpy()
    assert np.allclose(layer2[784:1568], expected, atol=1e-4)
    # a bank cut to 2 shots is the first 2 images
    bank = load_reference_bank(str(tmp_path), "screw", extractor.describe(), 2)
    assert bank.num_shots == 2 and bank.levels[0].shape == (2 * 3136, 24)
    # features made in float32 do not serve a run whose backbone runs in bfloat16 (--amp bf16), and back
    assert meta["amp"] == "none"
    with pytest.raises(UserError, match=r"extracted with --amp none, this run uses --amp bf16"):
        load_reference_bank(str(tmp_path), "screw", dict(extractor.describe(), amp="bf16"), 2)
    set_amp(extractor, "bf16")
    try:
        extract_reference_features("mvtec", root, str(tmp_path / "bf16"), extractor, shots=2, classes=["screw"])
        bf16 = load_reference_bank(str(tmp_path / "bf16"), "screw", extractor.describe(), 2)
    finally:
        set_amp(extractor, "none")
    # bfloat16 features are close to the float32 ones but not equal (the change --amp makes)
    gap = (bf16.levels[1] - bank.levels[1]).abs().max().item()
    assert 0 < gap < 0.1 * bank.levels[1].abs().max().item()
    with pytest.raises(UserError, match=r"--amp bf16, this run uses --amp none"):
        load_reference_bank(str(tmp_path / "bf16"), "screw", extractor.describe(), 2)


def _write_bank(folder, channels, rows, backbone=OFFLINE_BACKBONE):
    folder.mkdir(parents=True)
    for level, (c, r) in enumerate(zip(channels, rows), start=1):
        np.save(folder / f"layer{level}.npy", np.zeros((r, c), np.float32))
    (folder / "meta.json").write_text(json.dumps({"backbone": backbone}))


def test_reference_bank_checks(tmp_path, extractor):
    desc = extractor.describe()
    good = [3136 * 4, 784 * 4, 196 * 4]
    _write_bank(tmp_path / "ok" / "a", [24, 40, 112], good)
    assert load_reference_bank(str(tmp_path / "ok"), "a", desc, 4).num_shots == 4
    with pytest.raises(UserError, match="holds only 4 shots"):
        load_reference_bank(str(tmp_path / "ok"), "a", desc, 5)
    with pytest.raises(UserError, match="no reference features for class 'b'"):
        load_reference_bank(str(tmp_path / "ok"), "b", desc, 1)
    _write_bank(tmp_path / "w50" / "a", [256, 512, 1024], good, backbone="wide_resnet50_2")
    with pytest.raises(UserError, match="extracted with --backbone wide_resnet50_2"):
        load_reference_bank(str(tmp_path / "w50"), "a", desc, 1)
    _write_bank(tmp_path / "nometa" / "a", [256, 512, 1024], good)
    (tmp_path / "nometa" / "a" / "meta.json").unlink()  # the authors' files carry no meta: channels tell
    with pytest.raises(UserError, match="another backbone"):
        load_reference_bank(str(tmp_path / "nometa"), "a", desc, 1)
    _write_bank(tmp_path / "missing" / "a", [24, 40, 112], good)
    (tmp_path / "missing" / "a" / "layer3.npy").unlink()
    with pytest.raises(UserError, match="missing .*layer3.npy"):
        load_reference_bank(str(tmp_path / "missing"), "a", desc, 1)
    with pytest.raises(UserError, match="folder not found"):
        load_reference_bank(str(tmp_path / "nowhere"), "a", desc, 1)


def test_extraction_flag_checks(tmp_path, extractor):
    import extract_ref_features

    with pytest.raises(UserError, match="--shots 0"):  # a range check of the parser, which names the flag
        extract_ref_features.main(["--dataset", "demo", "--few_shot_dir", str(tmp_path), "--save_dir",
                                   str(tmp_path / "out"), "--shots", "0"])
    with pytest.raises(ValueError):  # the library's own check
        extract_reference_features("demo", str(tmp_path), str(tmp_path / "out"), extractor, shots=0)
    with pytest.raises(UserError, match="few-shot folder .*weave.* not found"):
        extract_reference_features("demo", str(tmp_path), str(tmp_path / "out"), extractor, classes=["weave"])
    assert not (tmp_path / "out").exists()
