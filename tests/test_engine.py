"""Training steps and the whole run (extract -> train -> evaluate -> files) on generated data."""
import hashlib
import json
import math
import os
import platform
import re
import subprocess
from importlib import metadata

import numpy as np
import pandas as pd
import pytest
import sklearn
import timm
import torch
import torchvision
from matplotlib.image import imread

from datasets import DEMO_SEEN, DEMO_UNSEEN, generate_demo_dataset
from models.extractor import OFFLINE_BACKBONE, build_extractor
from models.resad import ResAD
from models.resad import ModelConfig
from tests.run_helpers import fit, make_args
from utils.cli.adapters import run_config
from utils.formats.run_outputs import CSV_COLUMNS
from utils.metrics import METRIC_NAMES
from utils.run.extraction import extract_reference_features
from utils.run.training import FLOW_MINIBATCH, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage2", [False, True])
def test_every_level_flow_is_trained_in_a_step(stage2):
    torch.manual_seed(0)
    np.random.seed(0)
    channels, sizes, batch = [6, 6, 6], [56, 28, 14], 32
    model = ResAD(channels, ModelConfig(num_embeddings=16, coupling_layers=2, pos_embed_dim=16))
    trainer = Trainer(model, run_config(make_args(lr=1e-3), [4], {4: "run"}).training)
    features = [torch.rand(batch, c, s, s) for c, s in zip(channels, sizes)]
    residuals = [f.square() for f in features]
    masks = torch.zeros(batch, 1, 224, 224)
    if stage2:
        masks[:4, :, 50:120, 60:150] = 1
    before = [[p.detach().clone() for p in flow.parameters()] for flow in model.flows]
    steps = []
    original = trainer.optimizers["flow"].step
    trainer.optimizers["flow"].step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    trainer.train_step(features, residuals, masks, stage2=stage2, generator=torch.Generator().manual_seed(0))
    for level, flow in enumerate(model.flows):
        changed = [not torch.equal(b, p) for b, p in zip(before[level], flow.parameters()) if p.requires_grad]
        assert all(changed), f"level {level}: some flow parameters were not updated"
    # level 3 has 32 * 14 * 14 = 6272 < 8192 positions: the authors' loop would skip it entirely
    assert len(steps) == sum(math.ceil(batch * s * s / FLOW_MINIBATCH) for s in sizes)
    assert trainer.boundaries.get(2) != 0.0


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return generate_demo_dataset(str(tmp_path_factory.mktemp("data") / "demo"), n_train=6, n_test_good=2,
                                 n_test_anomalous=3)


@pytest.fixture(scope="module")
def demo_refs(demo_root, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("refs") / "demo_2shot")
    extract_reference_features("demo", demo_root, folder, build_extractor(OFFLINE_BACKBONE), shots=2,
                               classes=DEMO_UNSEEN)
    return folder


def demo_args(demo_root, demo_refs, out, **overrides):
    settings = dict(setting="demo", train_dataset_dir=demo_root, test_dataset_dir=demo_root,
                    test_ref_feature_dir=demo_refs, num_ref_shot=2, train_ref_shot=2, train_ref_pool=3,
                    backbone=OFFLINE_BACKBONE, epochs=2, stage1_epochs=1, batch_size=8, eval_batch_size=8,
                    lr=1e-4, eval_freq=1, num_workers=0, checkpoint_path=str(out), coupling_layers=2,
                    num_embeddings=64, num_heatmaps=2, device="cpu")
    settings.update(overrides)
    return make_args(**settings)


@pytest.mark.slow
def test_fit_trains_evaluates_and_writes_everything(demo_root, demo_refs, tmp_path, capsys):
    args = demo_args(demo_root, demo_refs, tmp_path)
    tables = fit(args, shots=[2], run_names={2: "demo"})
    run = tmp_path / "demo"
    for epoch in (1, 2):
        frame = pd.read_csv(run / f"demo_epoch{epoch}_metrics.csv")
        assert tuple(frame.columns) == CSV_COLUMNS
        assert frame["Class Name"].tolist() == list(DEMO_UNSEEN) + ["Mean"]
        values = frame.drop(columns="Class Name").to_numpy()
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
        assert np.allclose(values[-1], values[:-1].mean(axis=0), atol=1e-4)
        payload = json.loads((run / f"demo_epoch{epoch}_metrics.json").read_text())
        assert payload["epoch"] == epoch and set(payload["classes"]) == set(DEMO_UNSEEN) | {"Mean"}
        assert (run / f"demo_epoch{epoch}_pixel_auroc.png").stat().st_size > 0
    assert tables[2].iloc[-1]["Image AUC"] == pytest.approx(frame.iloc[-1]["Image AUC"], abs=1e-4)
    heatmaps = sorted(os.listdir(run / "heatmaps"))
    assert len(heatmaps) == 2 * len(DEMO_UNSEEN) and all(h.endswith(".png") for h in heatmaps)

    latest = torch.load(run / "demo_latest.pth", weights_only=True)
    assert latest["epoch"] == 2 and latest["trained_on"]["backbone"] == OFFLINE_BACKBONE and latest["args"]["setting"] == "demo"
    assert set(latest["trainer"]["optimizers"]) == {"vq", "constraintor", "flow"}
    assert set(latest["trainer"]["schedulers"]) == {"vq", "constraintor", "flow"}
    assert len(latest["trainer"]["boundaries"]["values"]) == 3 and "rng" in latest and "generator" in latest
    model = ResAD([24, 40, 112], ModelConfig(num_embeddings=64, coupling_layers=2))
    model.load_state_dict(latest["model"])  # a complete, loadable model
    best = torch.load(run / "demo_best.pth", weights_only=True)
    assert best["best"][2]["metric"] == "Image AUC" and best["best"][2]["epoch"] in (1, 2)
    out = capsys.readouterr().out
    assert "demo epoch 2: image AUROC" in out and "AUPRO" in out
    _check_history(run, out, latest)
    _check_run_record(run, args, demo_root, demo_refs)
    _check_single_maps(run)


def _check_single_maps(run):
    """<run>_epoch<E>_maps.csv: per map the class rows and a Mean; the run's result is the fused map
    (the authors' recipe), the kNN rows are the baseline CSV's."""
    for epoch in (1, 2):
        maps = pd.read_csv(run / f"demo_epoch{epoch}_maps.csv")
        assert list(maps.columns) == ["Class Name", "Map", *METRIC_NAMES]
        part = {name: rows[list(METRIC_NAMES)].to_numpy() for name, rows in maps.groupby("Map", sort=False)}
        assert list(part) == ["resad", "fused", "normality", "abnormality", "standardized", "residual",
                              "standardized_residual", "coarse_residual", "knn"]
        assert maps[maps["Map"] == "resad"]["Class Name"].tolist() == list(DEMO_UNSEEN) + ["Mean"]
        metrics = pd.read_csv(run / f"demo_epoch{epoch}_metrics.csv")[list(METRIC_NAMES)].to_numpy()
        baseline = pd.read_csv(run / f"demo_epoch{epoch}_baseline.csv")[list(METRIC_NAMES)].to_numpy()
        assert np.allclose(part["resad"], metrics, atol=1e-5) and np.array_equal(part["fused"], part["resad"])
        assert np.allclose(part["knn"], baseline, atol=1e-5)
        assert not np.allclose(part["normality"], part["abnormality"])
        assert not np.allclose(part["standardized"], part["fused"])
        assert not np.allclose(part["coarse_residual"], part["standardized_residual"])


def _check_history(run, printed, latest):
    history = pd.read_csv(run / "demo_history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["stage"].tolist() == [1, 2]
    for epoch in (1, 2):
        row = history.iloc[epoch - 1]
        mean = pd.read_csv(run / f"demo_epoch{epoch}_metrics.csv").iloc[-1]
        for metric in METRIC_NAMES:  # the Mean row of the evaluation after the epoch
            assert row[metric] == pytest.approx(mean[metric], abs=1e-5)
        line = re.search(rf"epoch {epoch}/2 \(stage {epoch}\): vq loss (\S+) \| occ loss (\S+) \| flow loss (\S+)",
                         printed)
        for column, value in zip(("vq_loss", "occ_loss", "flow_loss"), line.groups()):
            assert row[column] == pytest.approx(float(value), rel=1e-4, abs=1e-4)
        assert row["lr"] == 1e-4 and row["seconds"] > 0 and row["eval_seconds"] > 0
    assert history["skipped_steps"].sum() == latest["trainer"]["skipped_steps"]
    image = imread(run / "demo_history.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01


def _check_run_record(run, args, demo_root, demo_refs):
    record = json.loads((run / "demo_run.json").read_text())
    assert record["args"] == vars(args) and record["seed"] == args.seed and record["num_ref_shot"] == 2
    assert record["resumes"] == []
    created = record["created"]
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "torchvision": torchvision.__version__, "timm": timm.__version__, "scikit-learn": sklearn.__version__,
                "FrEIA": metadata.version("FrEIA")}  # FrEIA has no __version__
    assert created["versions"] == versions and created["device"]["device"] == "cpu"
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert created["git"]["commit"] == head.stdout.strip() and isinstance(created["git"]["dirty"], bool)
    def count(cls, split, anomalous):  # image counts, straight from the folders
        folder = os.path.join(demo_root, cls, split)
        return sum(len(os.listdir(os.path.join(folder, kind))) for kind in os.listdir(folder)
                   if (kind != "good") == anomalous)

    train, test = record["datasets"]["train"], record["datasets"]["test"]
    assert train["root"] == os.path.abspath(demo_root) and set(train["stage1"]) == set(DEMO_SEEN)
    for cls in DEMO_SEEN:
        assert train["stage1"][cls] == {"normal": count(cls, "train", False), "anomalous": 0}
        assert train["stage2"][cls] == {"normal": count(cls, "train", False) + count(cls, "test", False),
                                        "anomalous": count(cls, "test", True)}
    assert test["test"] == {cls: {"normal": count(cls, "test", False), "anomalous": count(cls, "test", True)}
                            for cls in DEMO_UNSEEN}
    references = record["reference_features"]
    assert references["dir"] == os.path.abspath(demo_refs) and references["shots_used"] == 2
    for cls in DEMO_UNSEEN:
        meta = references["classes"][cls]
        assert meta == json.loads(open(os.path.join(demo_refs, cls, "meta.json")).read())
        assert meta["backbone"] == OFFLINE_BACKBONE and meta["num_shots"] == 2 and len(meta["images"]) == 2
        for name, digest in meta["sha256"].items():
            assert digest == hashlib.sha256(open(os.path.join(demo_refs, cls, name), "rb").read()).hexdigest()


def _inject_nan(monkeypatch, should_poison):
    original = ResAD.flow_log_likelihoods
    calls = {"n": 0}

    def poisoned(self, level, rows, coords):
        logp, logp_a = original(self, level, rows, coords)
        if self.training:  # one call per flow mini-batch, i.e. per flow optimizer step
            calls["n"] += 1
            if should_poison(calls["n"]):
                logp = logp * float("nan")
        return logp, logp_a

    monkeypatch.setattr(ResAD, "flow_log_likelihoods", poisoned)
    return calls


def test_nan_steps_are_skipped_and_counted(demo_root, demo_refs, tmp_path, monkeypatch):
    calls = _inject_nan(monkeypatch, lambda n: n % 3 == 0)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        fit(demo_args(demo_root, demo_refs, tmp_path, epochs=1, num_heatmaps=0), shots=[2], run_names={2: "demo"})
    assert calls["n"] > 3
    latest = torch.load(tmp_path / "demo" / "demo_latest.pth", weights_only=True)
    poisoned_flow_steps = calls["n"] // 3
    assert latest["trainer"]["skipped_steps"] == poisoned_flow_steps
    assert pd.read_csv(tmp_path / "demo" / "demo_history.csv")["skipped_steps"].tolist() == [poisoned_flow_steps]
    assert all(torch.isfinite(v).all() for v in latest["model"].values() if v.is_floating_point())


def test_persistent_nan_stops_with_a_message_and_keeps_the_last_checkpoint(demo_root, demo_refs, tmp_path,
                                                                            monkeypatch):
    from utils.errors import UserError

    state = {"poison": False}
    _inject_nan(monkeypatch, lambda n: state["poison"])
    import utils.run.train_run as train_run
    original_eval = train_run.evaluate

    def evaluate_then_poison(*a, **k):
        out = original_eval(*a, **k)
        state["poison"] = True  # every step after the first evaluation is NaN
        return out

    monkeypatch.setattr(train_run, "evaluate", evaluate_then_poison)
    with pytest.raises(UserError, match="training diverged: 5 consecutive"):
        with pytest.warns(RuntimeWarning):
            fit(demo_args(demo_root, demo_refs, tmp_path, epochs=3, max_bad_steps=5, num_heatmaps=0),
                shots=[2], run_names={2: "demo"})
    latest = torch.load(tmp_path / "demo" / "demo_latest.pth", weights_only=True)
    assert latest["epoch"] == 1
    assert (tmp_path / "demo" / "demo_epoch1_metrics.csv").exists()
    assert not (tmp_path / "demo" / "demo_epoch2_metrics.csv").exists()
