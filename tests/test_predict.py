"""predict.py: scores, labels, heat-maps and the reference threshold of new images, on a trained demo checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from datasets import Sample, evaluation_samples
from models.anomaly_map import anomaly_maps, map_statistics
from models.extractor import OFFLINE_BACKBONE
from models.matching import ReferenceBank
from tests import run_helpers
from tests.conftest import CLASS
from utils.errors import UserError, run_cli
from utils.formats import checkpoint, reference_features
from utils.formats.predictions import SCORE_COLUMNS, read_scores
from utils.run.config import EvalConfig, PredictConfig
from utils.run.evaluation import evaluate
from utils.run.loaders import make_loader
from utils.run.predict_run import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(trained, out, **overrides) -> PredictConfig:
    values = dict(checkpoint=trained.ckpt, images=(trained.images,), out=str(out),
                  ref_features=os.path.join(trained.refs, CLASS), batch_size=2, device="cpu", num_workers=0)
    values.update(overrides)
    return PredictConfig(**values)


def test_predict_end_to_end_writes_scores_heatmaps_maps_and_a_record(trained, tmp_path, capsys):
    import predict as script

    out = tmp_path / "out"
    argv = ["--checkpoint", trained.ckpt, "--ref_images", trained.ref_images, "--num_ref_shot", "4",
            "--images", trained.images, "--out", str(out), "--save_maps", "--device", "cpu", "--num_workers", "0"]
    assert run_cli(script.main, argv) == 0
    table = read_scores(str(out / "scores.csv"))
    expected = sorted(os.path.join(d, f) for d, _, files in os.walk(trained.images) for f in files)
    assert tuple(table.columns) == SCORE_COLUMNS and table["image"].tolist() == expected
    record = json.loads((out / "predict_run.json").read_text())
    threshold = record["threshold"]
    assert threshold["from"] == "references" and len(threshold["reference_scores"]) == 4
    assert threshold["value"] == pytest.approx(max(threshold["reference_scores"]))
    assert np.allclose(table["threshold"], threshold["value"])
    assert (table["label"] == np.where(table["score"] > threshold["value"], "anomalous", "normal")).all()
    assert record["images"] == {"inputs": [os.path.abspath(trained.images)], "count": 5, "earlier": 0,
                                **{label: int((table["label"] == label).sum()) for label in set(table["label"])}}
    assert record["references"]["shots"] == 4 and record["created"]["git"]["commit"]
    assert record["status"] == "done" and record["calibration"]["computed"] and record["maps"]["normalization"] == \
        "references" and os.path.isfile(record["calibration"]["path"])
    for path, score in zip(table["image"], table["score"]):
        name = os.path.splitext(os.path.relpath(path, trained.images))[0]
        assert imread(out / "heatmaps" / f"{name}.png").shape[2] in (3, 4)
        raw = np.load(out / "maps" / f"{name}.npy")
        assert raw.dtype == np.float16 and raw.shape == (224, 224)
        assert float(raw.max()) == pytest.approx(score, rel=2e-3)  # the image score is the map's max
    printed = capsys.readouterr().out
    assert f"threshold {threshold['value']:.6g}: the max of the 4 references' scores (each against the other 3" \
        in printed
    # the same command again: every image is already scored, nothing changes, the calibration is read back
    assert run_cli(script.main, argv) == 0
    assert read_scores(str(out / "scores.csv")).equals(table)
    again = json.loads((out / "predict_run.json").read_text())
    assert again["images"]["earlier"] == 5 and not again["calibration"]["computed"]


@pytest.mark.parametrize("anomaly_map, image_score, normalization", [
    ("authors", "max", "set"), ("standardized", "mean_top1pct", "set"), ("coarse_residual", "mean_top1pct", "set"),
    ("coarse_knn", "mean_top1pct", "set"), ("authors", "max", "references"), ("coarse_knn", "mean_top1pct", "references")])
def test_scores_equal_the_evaluation_of_the_same_images_and_references(trained, tmp_path, anomaly_map, image_score,
                                                                       normalization):
    """Predicted in batches of 2 images (under the set's statistics: gathered over three chunks) against the
    evaluation's own code path on the whole class at once (8 images a batch), same references, same normalisation."""
    predict(config(trained, tmp_path, anomaly_map=anomaly_map, image_score=image_score, save_maps=True,
                   heatmaps=False, normalization=normalization), extractor=trained.extractor)
    table = read_scores(str(tmp_path / "scores.csv"))
    state = checkpoint.open_model(trained.ckpt)
    model = checkpoint.build_model(state, trained.extractor, 0.4, torch.device("cpu"))
    bank = reference_features.load_bank(trained.refs, CLASS, trained.extractor.describe(), 4)
    samples = evaluation_samples("demo", trained.root, CLASS)
    settings = EvalConfig(shots=(4,), batch_size=8, aupro=False, anomaly_map=anomaly_map, image_score=image_score,
                          map_metrics=False, normalization=normalization)
    result = evaluate(model, trained.extractor, {CLASS: samples}, {CLASS: bank}, settings, torch.device("cpu"),
                      num_heatmaps=len(samples))[4][CLASS]
    evaluated = {item["path"]: item for item in result.heatmaps}
    assert sorted(evaluated) == sorted(table["image"])
    for path, score in zip(table["image"], table["score"]):
        assert score == pytest.approx(evaluated[path]["score"], rel=1e-5, abs=1e-6)
        name = os.path.splitext(os.path.relpath(path, trained.images))[0]
        raw = np.load(tmp_path / "maps" / f"{name}.npy").astype(np.float32)
        assert np.allclose(raw, evaluated[path]["map"], rtol=1e-3, atol=1e-3)  # float16 files


def test_knn_baseline_beside_coarse_knn_reuses_its_search_with_the_same_metrics(trained):
    """Under coarse_knn the baseline reads ResAD's nearest-reference distances instead of searching again;
    its metrics must equal those of its own search (the authors' map) on the same images, k = 2 and 4."""
    state = checkpoint.open_model(trained.ckpt)
    model = checkpoint.build_model(state, trained.extractor, 0.4, torch.device("cpu"))
    bank = reference_features.load_bank(trained.refs, CLASS, trained.extractor.describe(), 4)
    samples = evaluation_samples("demo", trained.root, CLASS)
    knn = {}
    for anomaly_map in ("authors", "coarse_knn"):
        settings = EvalConfig(shots=(2, 4), batch_size=3, aupro=True, anomaly_map=anomaly_map, map_metrics=False)
        result = evaluate(model, trained.extractor, {CLASS: samples}, {CLASS: bank}, settings, torch.device("cpu"),
                          knn_cache={})
        knn[anomaly_map] = {k: result[k][CLASS].knn["knn"] for k in (2, 4)}
    assert knn["authors"] == knn["coarse_knn"] and knn["authors"][2] != knn["authors"][4]


def test_set_threshold_is_the_leave_one_out_reference_scores_max_or_quantile(trained, tmp_path):
    """--normalization set, by hand: each reference image encoded alone and scored with ResAD.forward against a
    bank built from the other three images' features; maps with the statistics of the whole test set."""
    extractor = trained.extractor
    model = checkpoint.build_model(checkpoint.open_model(trained.ckpt), extractor, 0.4, torch.device("cpu"))
    files = sorted(os.listdir(trained.ref_images))[:4]
    loader = make_loader([Sample(os.path.join(trained.ref_images, f), 0, (), CLASS) for f in files], extractor, 1, 0)
    with torch.inference_mode():
        features = [extractor(batch["image"]) for batch in loader]
        tests = make_loader(evaluation_samples("demo", trained.root, CLASS), extractor, 5, 0)
        whole = model(extractor(next(iter(tests))["image"]), ReferenceBank.from_features(
            [torch.cat(level) for level in zip(*features)]))
        statistics = map_statistics([whole.logps], size=224)
        scores = []
        for i, mine in enumerate(features):
            others = ReferenceBank.from_features([torch.cat(level)
                                                  for level in zip(*(features[:i] + features[i + 1:]))])
            out = model(mine, others)
            scores.append(float(anomaly_maps(out.logps, out.abnormal_probs, statistics=statistics).max()))
    for quantile, expected in ((None, max(scores)), (0.5, float(np.median(scores)))):
        out = tmp_path / f"q{quantile}"
        record = predict(config(trained, out, ref_features=None, ref_images=trained.ref_images, num_ref_shot=4,
                                threshold_quantile=quantile, heatmaps=False, normalization="set"), extractor=extractor)
        assert record["threshold"]["reference_scores"] == pytest.approx(scores, rel=1e-5)
        assert record["threshold"]["value"] == pytest.approx(expected, rel=1e-5)
        assert np.allclose(read_scores(str(out / "scores.csv"))["threshold"], expected, rtol=1e-6)
    fixed = predict(config(trained, tmp_path / "fixed", threshold=0.5, heatmaps=False, normalization="set"),
                    extractor=extractor)
    assert fixed["threshold"] == {"value": 0.5, "from": "--threshold"}
    assert set(read_scores(str(tmp_path / "fixed" / "scores.csv"))["label"]) == {"anomalous"}  # all above 0.5


def test_an_unreadable_image_among_many_is_a_warning_and_a_failed_row(trained, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(trained.images, images)
    broken = images / "later" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image")
    out = images / "results"  # inside the images: an earlier run's heat-maps there are not images to score
    (out / "heatmaps").mkdir(parents=True)
    shutil.copy(os.path.join(trained.images, "good", "000.png"), out / "heatmaps" / "earlier.png")
    predict(config(trained, tmp_path / "clean", heatmaps=False), extractor=trained.extractor)
    capsys.readouterr()
    predict(config(trained, out, images=(str(images),)), extractor=trained.extractor)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and str(broken) in warning[0] and "marked failed" in warning[0]
    table = read_scores(str(out / "scores.csv"))
    row = table[table["image"] == str(broken)].iloc[0]
    assert row["label"] == "failed" and np.isnan(row["score"]) and "cannot read image" in row["error"]
    clean = read_scores(str(tmp_path / "clean" / "scores.csv"))
    scored = table[table["label"] != "failed"]
    assert [os.path.relpath(p, images) for p in scored["image"]] == \
        [os.path.relpath(p, trained.images) for p in clean["image"]]
    assert np.allclose(scored["score"], clean["score"], rtol=1e-6)  # the failed image is not in the set
    heatmaps = sorted(str(p.relative_to(out / "heatmaps")) for p in out.rglob("*.png"))
    assert len(heatmaps) == 6 and "earlier.png" in heatmaps and not any("broken" in h for h in heatmaps)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the scratch store is gone


def run_script(*args):
    return run_helpers.run_script("predict.py", *args)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), proc.stderr


def test_bad_input_is_one_line_and_exit_2_and_keeps_earlier_results(trained, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--checkpoint", trained.ckpt, "--out", out, "--device", "cpu", "--num_workers", 0]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert_one_line_error(run_script(*common, "--ref_images", trained.ref_images, "--images", empty),
                          f"--images {empty}: the folder holds no images")
    foreign = tmp_path / "foreign" / CLASS
    shutil.copytree(os.path.join(trained.refs, CLASS), foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps(dict(meta, backbone="wide_resnet50_2")))
    assert_one_line_error(run_script(*common, "--ref_features", foreign, "--images", trained.images),
                          f"--ref_features {foreign}", "--backbone wide_resnet50_2",
                          f"--checkpoint {trained.ckpt} holds a model trained with --backbone {OFFLINE_BACKBONE}")
    assert not out.exists()
    import predict as script
    (foreign / "meta.json").write_text(json.dumps(dict(meta, resize="full")))
    argv = [str(a) for a in common] + ["--ref_features", str(foreign), "--images", trained.images]
    assert run_cli(script.main, argv) == 2 and not out.exists()
    assert f"--ref_features {foreign}: features were extracted with --resize full, this run uses --resize crop" \
        in capsys.readouterr().err
    # an --out holding a scores.csv that is not one stops in one line and leaves it as it was
    out.mkdir()
    (out / "scores.csv").write_text("earlier results\n")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for name in ("a.png", "b.jpg"):
        (unreadable / name).write_bytes(b"junk")
    argv = [str(a) for a in common] + ["--ref_images", trained.ref_images, "--images", str(unreadable)]
    assert run_cli(script.main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"--out {out / 'scores.csv'}: columns" in errors[0]
    assert (out / "scores.csv").read_text() == "earlier results\n"
    # a run that finds no readable image stops in one line and writes nothing, under either normalisation
    for normalization in ("references", "set"):
        fresh = tmp_path / f"fresh_{normalization}"
        assert run_cli(script.main, [a if a != str(out) else str(fresh) for a in argv]
                       + ["--normalization", normalization]) == 2
        assert "none of the 2 images could be read" in capsys.readouterr().err and not fresh.exists()
    assert_one_line_error(run_script(*common, "--ref_images", trained.ref_images, "--images", "-", trained.images),
                          "--images -: reads image paths from standard input alone")


# --------------------------------------------------------------------------- one image at a time

MTD = os.path.join(REPO, "..", "shared", "data", "real", "mtd", "magnetic_tile")
needs_mtd = pytest.mark.skipif(not os.path.isdir(MTD), reason="../shared/data/real/mtd not present")


@pytest.mark.slow
@needs_mtd
@pytest.mark.parametrize("preset", ["authors", "recommended"])
def test_a_part_gets_the_same_score_and_label_whatever_is_scored_with_it(trained, preset):
    """Real Magnetic Tile Defects images, k = 1, 2, 4, 8 of its references: each image scored alone, with the
    others, with only the normal ones and with only the defective ones gets one score (rel 1e-5) and one label."""
    from utils.run.predictor import Inferencer

    normal = sorted(os.listdir(os.path.join(MTD, "test", "good")))[:3]
    defective = sorted(os.listdir(os.path.join(MTD, "test", "crack")))[:3]
    images = ([os.path.join(MTD, "test", "good", f) for f in normal]
              + [os.path.join(MTD, "test", "crack", f) for f in defective])
    for k in (1, 2, 4, 8):
        inferencer = Inferencer(trained.ckpt, ref_images=os.path.join(MTD, "train", "good"), num_ref_shot=k,
                                preset=preset, extractor=trained.extractor, device="cpu")
        together = inferencer.predict_batch(images)
        groups = [[inferencer.predict(image) for image in images],
                  inferencer.predict_batch(images[:3]) + inferencer.predict_batch(images[3:])]
        for group in groups:
            assert np.allclose([p.score for p in group], [p.score for p in together], rtol=1e-5, atol=0)
            assert [p.label for p in group] == [p.label for p in together]
        assert inferencer.scorer.calibration.rule == ("self_excluded" if k == 1 else "leave_one_out")
        assert np.isfinite(inferencer.threshold)


def test_inferencer_scores_a_path_a_pil_image_and_a_tensor_alike(trained, tmp_path):
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from utils.run.predictor import Inferencer

    inferencer = Inferencer(trained.ckpt, ref_features=os.path.join(trained.refs, CLASS), preset="recommended",
                            extractor=trained.extractor, device="cpu", calibration_dir=str(tmp_path))
    path = os.path.join(trained.images, "good", "000.png")
    picture = Image.open(path)
    results = [inferencer.predict(path), inferencer.predict(picture), inferencer.predict(to_tensor(picture.convert("RGB")))]
    assert len({round(r.score, 6) for r in results}) == 1 and results[0].map.shape == (224, 224)
    assert results[0].label == ("anomalous" if results[0].score > inferencer.threshold else "normal")
    assert results[0].score == pytest.approx(float(np.sort(results[0].map.ravel())[-501:].mean()), rel=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [inferencer.scorer.calibration_record["path"].split(os.sep)[-1]]
    again = Inferencer(trained.ckpt, ref_features=os.path.join(trained.refs, CLASS), preset="recommended",
                       extractor=trained.extractor, device="cpu", calibration_dir=str(tmp_path))
    assert not again.scorer.calibration_record["computed"] and again.predict(path).score == results[0].score
    with pytest.raises(ValueError, match="3, H, W"):
        inferencer.predict(torch.zeros(1, 8, 8))


def test_output_names_never_collide():
    from utils.formats.predictions import output_names

    found = [("d1/x.png", "d1"), ("d2/x.png", "d2"), ("d1/x_png_2.png", "d1"), ("d1/y.png", "d1"),
             ("d1/y.jpg", "d1"), ("d2/y_png.bmp", "d2")]
    names = output_names(found)
    assert len(set(names)) == len(names) == 6
    assert names[:2] == ["x_png", "x_png_2"] and names[2] == "x_png_2_2" and names[3:5] == ["y_png", "y_jpg"]


def test_out_may_contain_the_images_and_references_among_them_are_not_scored(trained, tmp_path, capsys):
    """--out . over a folder of images (the images are scored, our own heat-maps are not), and the reference
    images under --images are left out with a note."""
    work = tmp_path / "work"
    shutil.copytree(trained.images, work / "parts")
    shutil.copytree(trained.ref_images, work / "parts" / "refs")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        record = predict(config(trained, ".", images=("parts",), ref_features=None,
                                ref_images=os.path.join("parts", "refs"), num_ref_shot=4), extractor=trained.extractor)
        assert "4 of the images are the references themselves" in capsys.readouterr().out
        table = read_scores("scores.csv")
        used = {os.path.join("parts", "refs", f) for f in sorted(os.listdir(trained.ref_images))[:4]}
        assert len(table) == 7 and not used & set(table["image"]) and record["images"]["count"] == 7  # 2 refs unused
        assert len([f for _, _, files in os.walk("heatmaps") for f in files]) == 7
        again = predict(config(trained, ".", images=("parts",), ref_features=None,
                               ref_images=os.path.join("parts", "refs"), num_ref_shot=4), extractor=trained.extractor)
        with pytest.raises(UserError, match="heat-maps of --out left out"):
            predict(config(trained, ".", images=("heatmaps",)), extractor=trained.extractor)
    finally:
        os.chdir(cwd)
    assert again["images"]["earlier"] == 7


def test_an_interrupted_run_is_continued_and_another_run_is_refused(trained, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    predict(config(trained, whole, heatmaps=False), extractor=trained.extractor)
    expected = read_scores(str(whole / "scores.csv"))
    predict(config(trained, cut, heatmaps=False), extractor=trained.extractor)
    lines = (cut / "scores.csv").read_text().splitlines(keepends=True)
    (cut / "scores.csv").write_text("".join(lines[:3]) + lines[3][:10])   # killed while writing row 3
    record = predict(config(trained, cut, heatmaps=False), extractor=trained.extractor)
    assert record["images"]["earlier"] == 2 and record["images"]["count"] == 5
    table = read_scores(str(cut / "scores.csv"))
    assert sorted(table["image"]) == sorted(expected["image"])
    assert np.allclose(table.set_index("image").loc[expected["image"], "score"], expected["score"], rtol=1e-6)
    with pytest.raises(UserError, match="holds the scores.csv of another run \\(other threshold\\)"):
        predict(config(trained, cut, heatmaps=False, threshold=0.5), extractor=trained.extractor)


@pytest.mark.slow
def test_images_on_standard_input_are_scored_as_they_come(trained, tmp_path):
    folder = tmp_path / "folder"
    predict(config(trained, folder, heatmaps=False), extractor=trained.extractor)
    expected = read_scores(str(folder / "scores.csv"))
    out = tmp_path / "stream"
    paths = "\n".join(expected["image"]) + "\n"
    proc = subprocess.run([sys.executable, "predict.py", "--checkpoint", trained.ckpt, "--ref_features",
                           os.path.join(trained.refs, CLASS), "--images", "-", "--out", str(out), "--device", "cpu",
                           "--num_workers", "0", "--batch_size", "2"], cwd=REPO, input=paths, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = read_scores(str(out / "scores.csv"))
    assert table["image"].tolist() == expected["image"].tolist()
    assert np.allclose(table["score"], expected["score"], rtol=1e-5) and (table["label"] == expected["label"]).all()
    assert len(list((out / "heatmaps").iterdir())) == 5


def test_stdin_paths_come_in_batches_of_at_most_the_batch_size():
    import io

    from utils.run.predict_run import stdin_paths

    assert list(stdin_paths(io.StringIO("a\n\nb\nc\n d \ne\n"), 2)) == [["a", "b"], ["c", "d"], ["e"]]


def test_evaluation_writes_per_image_scores_and_the_baseline_raw_and_under_resads_rule(trained, tmp_path):
    """<run>_epoch<E>_scores.csv: one row per test image, whose scores give the metrics CSV's image AUROC;
    the baseline's table has a knn and a knn_normalized row, and its own per-image scores."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from utils.formats.run_outputs import RunOutputs
    from utils.report.results import write_evaluation, write_knn_beside

    state = checkpoint.open_model(trained.ckpt)
    model = checkpoint.build_model(state, trained.extractor, 0.4, torch.device("cpu"))
    bank = reference_features.load_bank(trained.refs, CLASS, trained.extractor.describe(), 4)
    samples = evaluation_samples("demo", trained.root, CLASS)
    settings = EvalConfig(shots=(4,), batch_size=3, aupro=False, anomaly_map="coarse_knn",
                          image_score="mean_top1pct", normalization="references")
    result = evaluate(model, trained.extractor, {CLASS: samples}, {CLASS: bank}, settings, torch.device("cpu"),
                      knn_cache={})[4]
    out = RunOutputs(str(tmp_path), "run")
    metrics = write_evaluation(out, 1, result, heatmaps=False)
    baseline = write_knn_beside(out, 1, result)
    scores = pd.read_csv(out.scores_csv(1))
    assert scores["Image"].tolist() == [s.image for s in samples] and scores["Label"].tolist() == [s.label for s in samples]
    assert {"resad", "fused", "coarse_knn", "standardized"} <= set(scores.columns)
    assert roc_auc_score(scores["Label"], scores["resad"]) == pytest.approx(metrics["Image AUC"].iloc[0], abs=1e-5)
    assert (scores["resad"] == scores["coarse_knn"]).all()
    assert list(dict.fromkeys(baseline["Map"])) == ["knn", "knn_normalized"]
    knn_scores = pd.read_csv(out.baseline_scores_csv(1))
    for name in ("knn", "knn_normalized"):
        auroc = baseline[(baseline["Map"] == name) & (baseline["Class Name"] == CLASS)]["Image AUC"].iloc[0]
        assert roc_auc_score(knn_scores["Label"], knn_scores[name]) == pytest.approx(auroc, abs=1e-5)
    maps = pd.read_csv(out.maps_csv(1))
    assert {"knn", "knn_normalized", "resad"} <= set(maps["Map"])


def test_the_nearest_reference_search_covers_only_the_levels_read(trained, monkeypatch):
    """Under coarse_knn the search skips the finest level (most of its cost), unless the raw baseline, which
    reads every level, is computed in the same evaluation; the authors' map needs no search at all."""
    import models.resad as resad

    searched, real = [], resad.knn_level_maps
    monkeypatch.setattr(resad, "knn_level_maps", lambda *a, levels=None, **k: searched.append(levels) or
                        real(*a, levels=levels, **k))
    state = checkpoint.open_model(trained.ckpt)
    model = checkpoint.build_model(state, trained.extractor, 0.4, torch.device("cpu"))
    bank = reference_features.load_bank(trained.refs, CLASS, trained.extractor.describe(), 4)
    samples = evaluation_samples("demo", trained.root, CLASS)
    cache = {}
    for anomaly_map, knn_cache, expected in (("coarse_knn", None, [1, 2]), ("coarse_knn", cache, [0, 1, 2]),
                                             ("coarse_knn", cache, [1, 2]), ("authors", None, None)):
        searched.clear()
        settings = EvalConfig(shots=(4,), batch_size=8, aupro=False, anomaly_map=anomaly_map, map_metrics=False)
        evaluate(model, trained.extractor, {CLASS: samples}, {CLASS: bank}, settings, torch.device("cpu"),
                 knn_cache=knn_cache)
        assert searched == ([expected] if expected else []), (anomaly_map, searched)
