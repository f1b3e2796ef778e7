"""Synthetic defects, training from normal images alone, the `folder` dataset, custom settings, kNN baseline."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from datasets import NORMAL, Sample, custom_setting, dataset_classes, evaluation_samples, training_samples
from datasets.anomaly_source import SyntheticAnomalyDataset, choose_anomaly_source
from datasets.defects import DEFECT_FAMILIES, defect_region, foreground_estimate, synthesize_anomaly
from models.knn_baseline import knn_anomaly_maps, knn_level_maps, nearest_distances
from models.matching import Matcher, ReferenceBank
from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEWSHOT = os.path.join(REPO, "..", "shared", "data", "fewshot")
SIZE = 96


def textured(seed: int) -> np.ndarray:
    """A random smooth-but-busy texture (every blur, warp or paste changes its pixels)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((SIZE, SIZE, 3)), sigma=(1.5, 1.5, 0))
    return ((noise - noise.min()) / (noise.max() - noise.min())).astype(np.float32)


def object_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured disk on a flat grey background, and the disk."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disk = (yy - 50) ** 2 + (xx - 44) ** 2 < 30 ** 2
    image = np.full((SIZE, SIZE, 3), 0.3, np.float32)
    image[disk] = 0.6 + 0.4 * textured(seed)[disk]
    return image, disk


# ----------------------------------------------------------------------------- defects

@pytest.mark.parametrize("family", list(DEFECT_FAMILIES))
def test_defect_mask_is_exactly_the_changed_pixels_and_reproducible(family):
    image, donor = textured(0), textured(1)
    for seed in range(4):
        out, mask = synthesize_anomaly(np.random.default_rng(seed), image, donor, [family], use_foreground=False)
        changed = np.abs(out - image).max(axis=2) > 1e-6
        assert mask.dtype == bool and mask.any() and out.shape == image.shape
        assert not (changed & ~mask).any()                # nothing changes outside the mask
        assert changed[mask].mean() > 0.9                  # and (nearly) every mask pixel changed
        again, mask2 = synthesize_anomaly(np.random.default_rng(seed), image, donor, [family], use_foreground=False)
        assert np.array_equal(mask, mask2) and np.array_equal(out, again)
    other, other_mask = synthesize_anomaly(np.random.default_rng(99), image, donor, [family], use_foreground=False)
    assert not np.array_equal(other_mask, mask)


@pytest.mark.parametrize("family", list(DEFECT_FAMILIES))
def test_defect_stays_on_the_object(family):
    image, disk = object_image(2)
    donor, _ = object_image(3)
    region = defect_region(image)
    assert not (region & ~disk).any() and region.sum() > 0.8 * ndimage.binary_erosion(disk, iterations=3).sum()
    for seed in range(5):
        out, mask = synthesize_anomaly(np.random.default_rng(seed), image, donor, [family])
        assert mask.any() and not (mask & ~region).any()
        assert np.array_equal(out[~disk], image[~disk])     # the background is untouched


def test_foreground_estimate_finds_objects_and_not_textures():
    image, disk = object_image(4)
    found = foreground_estimate(image)
    assert found is not None and (found & disk).sum() / (found | disk).sum() > 0.95
    assert foreground_estimate(textured(5)) is None
    assert defect_region(textured(5)).all()


def test_synthetic_dataset_is_reproducible_per_seed_and_epoch(tmp_path):
    samples = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray((textured(10 + i) * 255).astype(np.uint8)).save(path)
        samples.append(Sample(str(path), NORMAL, (), "tex"))
    ds = SyntheticAnomalyDataset(samples, image_size=64, fraction=0.5, seed=3)
    plain = [ds.samples and super(SyntheticAnomalyDataset, ds).__getitem__(i) for i in range(6)]

    def draw(epoch):
        ds.set_epoch(epoch)
        return [ds[i] for i in range(6)]

    first, again, later = draw(0), draw(0), draw(1)
    assert [a["label"] for a in first] == [b["label"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) for a, b in zip(first, again))
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, later))
    anomalous = [i for epoch in (first, later) for i, item in enumerate(epoch) if item["label"]]
    assert anomalous and len(anomalous) < 12
    for items in (first, later):
        for item, normal in zip(items, plain):
            changed = (item["image"] - normal["image"]).abs().amax(dim=0) > 1e-4
            mask = item["mask"][0] > 0.5
            assert bool(mask.any()) == bool(item["label"])
            assert not (changed & ~mask).any()


# ----------------------------------------------------------------------------- folder dataset and custom setting

def make_tree(root, classes, test=True):
    for c in classes:
        for split, kind in (("train", "good"),) + ((("test", "good"), ("test", "crack")) if test else ()):
            folder = root / c / split / kind
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i:03d}.png")
                if kind == "crack":
                    (root / c / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(
                        root / c / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return str(root)


def test_folder_dataset_and_custom_setting(tmp_path):
    root = make_tree(tmp_path / "mine", ["bolt", "gear", "nut"])
    assert dataset_classes("folder", root) == ("bolt", "gear", "nut")
    setting = custom_setting("folder", "folder", ["bolt", "gear"], ["nut"], root, root)
    assert (setting.source, setting.seen_classes, setting.unseen_classes) == ("folder", ("bolt", "gear"), ("nut",))
    assert len(training_samples("folder", root, setting.seen_classes, stage=1)) == 4
    tests = evaluation_samples("folder", root, "nut")
    assert [s.label for s in tests] == [1, 1, 0, 0] and all(s.masks for s in tests if s.label)
    assert custom_setting("folder", "mvtec", None, ["bottle"], root, "").seen_classes == ("bolt", "gear", "nut")

    with pytest.raises(UserError, match="nut both seen and unseen"):
        custom_setting("folder", "folder", ["bolt", "nut"], ["nut"], root, root)
    with pytest.raises(UserError, match="both seen and unseen"):
        custom_setting("folder", "folder", None, None, root, root)
    with pytest.raises(UserError, match=r"--unseen_classes: unknown folder class\(es\) washer"):
        custom_setting("folder", "folder", ["bolt"], ["washer"], root, root)
    with pytest.raises(UserError, match="unknown mvtec class"):
        custom_setting("mvtec", "folder", ["zebra"], ["nut"], "", root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        custom_setting("folder", "folder", None, ["nut"], str(tmp_path / "empty"), root)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="holds no class folders"):
        dataset_classes("folder", str(tmp_path / "flat"))
    with pytest.raises(UserError, match="needs --target_dataset"):
        custom_setting("folder", None, None, None, root, root)


def test_anomaly_source_defaults_to_synthetic_without_a_test_split(tmp_path, capsys):
    shots = make_tree(tmp_path / "shots", ["bolt", "gear"], test=False)
    full = make_tree(tmp_path / "full", ["bolt", "gear"])
    setting = custom_setting("folder", "mvtec", None, ["bottle"], shots, "")
    chosen, samples = choose_anomaly_source(None, setting, shots)
    assert chosen == "synthetic" and len(samples) == 4 and "stage-2 anomalies: synthetic" in capsys.readouterr().out
    with pytest.raises(UserError, match="--anomaly_source real: .*no test split.*use --anomaly_source synthetic"):
        choose_anomaly_source("real", setting, shots)
    assert choose_anomaly_source(None, setting, full)[0] == "real"
    chosen, samples = choose_anomaly_source("mixed", setting, full)
    assert chosen == "mixed" and sum(s.label for s in samples) == 4
    assert choose_anomaly_source("synthetic", setting, full)[1] == training_samples("folder", full, ["bolt", "gear"], 1)
    os.remove(os.path.join(full, "gear", "ground_truth", "crack", "001_mask.png"))
    with pytest.raises(UserError, match="no ground-truth mask"):  # a broken test split is not silently replaced
        choose_anomaly_source(None, setting, full)


# ----------------------------------------------------------------------------- kNN baseline

def test_nearest_distances_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(700, 24, generator=gen) * 3
    queries = torch.cat([torch.randn(300, 24, generator=gen) * 3, bank[:20] + 1e-3])
    brute = torch.cdist(queries.double(), bank.double()).min(dim=1).values
    got = nearest_distances(queries, bank, Matcher(tiles={"cpu": (2 ** 12, 128)}))
    assert torch.allclose(got.double(), brute, rtol=1e-5, atol=1e-5)
    assert torch.allclose(nearest_distances(bank[:5], bank), torch.zeros(5))


def test_knn_maps_match_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 8, 6, 6, generator=gen), torch.randn(2, 16, 3, 3, generator=gen)]
    refs = [torch.randn(3, 8, 6, 6, generator=gen), torch.randn(3, 16, 3, 3, generator=gen)]
    bank = ReferenceBank.from_features(refs)
    levels = knn_level_maps(features, bank)[3]
    for f, r, m in zip(features, refs, levels):
        rows = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]).double()
        for b, y, x in [(0, 0, 0), (1, 2, 1), (1, f.shape[2] - 1, f.shape[3] - 1)]:
            expected = (rows - f[b, :, y, x].double()).norm(dim=1).min()
            assert m[b, y, x].item() == pytest.approx(expected.item(), rel=1e-5)
    maps = knn_anomaly_maps(levels, size=32, sigma=2.0)
    up = sum(torch.nn.functional.interpolate(m[:, None], size=(32, 32), mode="bilinear", align_corners=True)[:, 0]
             for m in levels)
    expected = np.stack([ndimage.gaussian_filter(u.numpy().astype(np.float64), 2.0, mode="reflect") for u in up])
    assert np.allclose(maps.numpy(), expected, atol=1e-4)


# ----------------------------------------------------------------------------- training from a few-shot folder

FEWSHOT_MVTEC = os.path.join(FEWSHOT, "mvtec")
needs_fewshot = pytest.mark.skipif(not os.path.isdir(os.path.join(FEWSHOT_MVTEC, "bottle")),
                                   reason="few-shot data absent")


def small_args(*extra):
    from models.extractor import OFFLINE_BACKBONE
    from utils.cli.options import Parser, add_training_arguments

    return add_training_arguments(Parser()).parse_args([
        "--backbone", OFFLINE_BACKBONE, "--batch_size", "8", "--eval_batch_size", "8", "--train_ref_shot", "2",
        "--train_ref_pool", "4", "--lr", "1e-3", "--num_embeddings", "32", "--coupling_layers", "2",
        "--num_workers", "0", "--num_heatmaps", "0", *extra])


@needs_fewshot
def test_flow_loss_decreases_on_synthetic_anomalies_from_a_fewshot_folder():
    """Stage-2 training steps on one batch of a few-shot folder with synthetic anomalies."""
    from models.extractor import OFFLINE_BACKBONE, build_extractor
    from models.flow import grid_coordinates
    from models.losses import flow_loss
    from models.positions import flatten_positions
    from models.resad import ResAD
    from utils.cli.adapters import run_config
    from utils.run.loaders import make_loader
    from utils.run.reference_pool import TrainReferencePool
    from utils.run.training import Trainer, batch_residuals, level_masks, reference_draw

    torch.manual_seed(0)
    args = small_args("--lr", "1e-3")
    setting = custom_setting("folder", "demo", ["bottle", "hazelnut"], ["weave"], FEWSHOT_MVTEC, "")
    chosen, samples = choose_anomaly_source(None, setting, FEWSHOT_MVTEC)
    assert chosen == "synthetic" and len(samples) == 16 and not any(s.label for s in samples)
    extractor = build_extractor(OFFLINE_BACKBONE)
    loader = make_loader(samples, extractor, 8, 0, shuffle=True, generator=torch.Generator().manual_seed(0),
                         dataset_class=lambda *a, **k: SyntheticAnomalyDataset(*a, fraction=0.5, seed=0, **k))
    batch = next(iter(loader))
    assert 0 < int(batch["label"].sum()) < 8 and batch["mask"].sum() > 0
    config = run_config(args, [4], {4: "run"})
    model = ResAD(extractor.channels, config.model, config.evaluation.fdm_alpha)
    trainer, generator = Trainer(model, config.training), torch.Generator().manual_seed(0)
    normals = {c: [s for s in samples if s.class_name == c] for c in ("bottle", "hazelnut")}
    pool = TrainReferencePool(extractor, normals, 4, 8, 0, torch.device("cpu"))
    pool.refresh(generator)
    model.train()
    with torch.no_grad():
        features = extractor(batch["image"])
        residuals = batch_residuals(model, features, batch["class_name"],
                                    reference_draw(pool, batch["path"], 2, False, generator))
        constrained = model.constraintor(residuals)
    masks = [m.reshape(-1) for m in level_masks(batch["mask"], features)]
    rows = [(flatten_positions(e), grid_coordinates(e.shape[2], e.shape[3], e.device).repeat(e.shape[0], 1))
            for e in constrained]

    def flow_loss_now() -> float:
        # the stage-2 flow loss of the whole batch at fixed inputs and fixed boundaries, BG-SPP left out
        # (the per-step values mix random mini-batches and moving boundaries)
        with torch.no_grad():
            return float(np.mean([flow_loss(*model.flow_log_likelihoods(level, r, c), m, (0.0, -0.1), 0.0)
                                  for level, ((r, c), m) in enumerate(zip(rows, masks))]))

    before = flow_loss_now()
    for _ in range(6):
        trainer.train_step(features, residuals, batch["mask"], True, generator)
    assert flow_loss_now() < 0.95 * before


@needs_fewshot
def test_fit_in_synthetic_mode_on_a_fewshot_folder_writes_the_baseline(tmp_path, capsys):
    from datasets import DEMO_UNSEEN, generate_demo_dataset
    from models.extractor import OFFLINE_BACKBONE, build_extractor
    from tests.run_helpers import fit
    from utils.run.extraction import extract_reference_features

    demo = generate_demo_dataset(str(tmp_path / "demo"), n_train=2, n_test_good=2, n_test_anomalous=2)
    extractor = build_extractor(OFFLINE_BACKBONE)
    refs = str(tmp_path / "refs")
    extract_reference_features("demo", demo, refs, extractor, shots=2, classes=DEMO_UNSEEN[:1])
    args = small_args("--setting", "custom", "--source_dataset", "folder", "--train_dataset_dir", FEWSHOT_MVTEC,
                      "--seen_classes", "bottle", "--target_dataset", "demo", "--test_dataset_dir", demo,
                      "--unseen_classes", DEMO_UNSEEN[0], "--test_ref_feature_dir", refs, "--num_ref_shot", "2",
                      "--epochs", "1", "--stage1_epochs", "0", "--checkpoint_path", str(tmp_path / "out"))
    fit(args, shots=[2], run_names={2: "custom"}, extractor=extractor)
    out = capsys.readouterr().out
    assert "stage-2 anomalies: synthetic" in out and "custom kNN baseline: image AUROC" in out
    run = tmp_path / "out" / "custom"
    import pandas as pd
    main, knn = pd.read_csv(run / "custom_epoch1_metrics.csv"), pd.read_csv(run / "custom_epoch1_baseline.csv")
    # the authors' map does not standardize: the baseline's raw row only
    assert list(knn.columns) == ["Class Name", "Map"] + list(main.columns[1:]) and set(knn["Map"]) == {"knn"}
    assert knn["Class Name"].tolist() == [DEMO_UNSEEN[0], "Mean"]

    args.baseline = "knn"
    tables = fit(args, shots=[2], run_names={2: "custom"}, extractor=extractor)
    assert np.allclose(tables[2].drop(columns=["Class Name", "Map"]).to_numpy(),
                       knn.drop(columns=["Class Name", "Map"]).to_numpy(), atol=1e-4)  # the CSV keeps 5 decimals
    assert (run / "custom_baseline.csv").exists()
