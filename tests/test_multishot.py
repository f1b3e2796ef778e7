"""Multi-shot evaluation: prefix matching, several k from one matching, reference groups, failure images,
main_extended_multi_shot.py and --eval_only on generated data."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import main_extended_multi_shot
from datasets import DEMO_SEEN, DEMO_UNSEEN, generate_demo_dataset
from models.extractor import OFFLINE_BACKBONE, build_extractor
from models.resad import ResAD
from models.matching import Matcher, ReferenceBank, nearest_reference_indices, nearest_reference_indices_by_shots
from models.resad import ModelConfig
from utils.errors import UserError
from utils.formats.run_outputs import CSV_COLUMNS
from utils.report.failures import f1_max_threshold, failure_cases
from utils.report.results import evaluation_table as results_table
from utils.run.evaluation import ClassEvaluation, reference_groups
from utils.metrics import METRIC_NAMES
from utils.run.extraction import extract_reference_features


def separate_argmax(queries, bank_n, rows):
    """Brute force: the full similarity matrix against the first ``rows`` bank rows, torch.argmax."""
    return torch.argmax(F.normalize(queries, dim=1) @ bank_n[:rows].t(), dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_matching_equals_separate_k_shot_matchings_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    shots, per_shot, channels = 6, 37, 9
    bank = F.normalize(torch.randn(shots * per_shot, channels, generator=g), dim=1)
    queries = torch.randn(500, channels, generator=g)
    found = nearest_reference_indices_by_shots(queries, bank, shots, range(1, shots + 1))
    for k in range(1, shots + 1):
        assert torch.equal(found[k], nearest_reference_indices(queries, bank[: k * per_shot]))
        assert torch.equal(found[k], separate_argmax(queries, bank, k * per_shot))
    # asking for a subset gives the same indices
    subset = nearest_reference_indices_by_shots(queries, bank, shots, [2, 5])
    assert set(subset) == {2, 5} and all(torch.equal(subset[k], found[k]) for k in (2, 5))


@pytest.mark.parametrize("tile", [None, (4 * 4, 4)])
def test_prefix_matching_breaks_exact_ties_like_argmax(tile):
    # tiles of 4 query rows x 3-4 bank rows: ties across tiles and shots
    matcher = Matcher(tiles={"cpu": tile, "cuda": tile} if tile is not None else None)
    # Rows with four entries of +-1 have norm 2: normalised entries are +-0.5 and every dot
    # product is an exact sum of +-0.25, so equal similarities are exactly equal (many ties).
    g = torch.Generator().manual_seed(3)
    shots, per_shot, channels = 5, 6, 8

    def sparse_signs(n):
        rows = torch.zeros(n, channels)
        for r in range(n):
            cols = torch.randperm(channels, generator=g)[:4]
            rows[r, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
        return rows

    raw = sparse_signs(shots * per_shot)
    raw[3 * per_shot:4 * per_shot] = raw[0:per_shot]          # shot 4 duplicates shot 1
    raw[per_shot + 2] = raw[per_shot + 1]                      # a duplicated row inside shot 2
    bank = F.normalize(raw, dim=1)
    queries = torch.cat([sparse_signs(300), raw[:per_shot] * 3.0])
    found = matcher.nearest_by_shots(queries, bank, shots, range(1, shots + 1))
    sims = F.normalize(queries, dim=1) @ bank.t()
    ties = 0
    for k in range(1, shots + 1):
        expected = separate_argmax(queries, bank, k * per_shot)
        assert torch.equal(found[k], expected)
        best = sims[:, : k * per_shot].max(dim=1, keepdim=True).values
        first = torch.stack([torch.nonzero(row == b)[0, 0] for row, b in zip(sims[:, : k * per_shot], best)])
        assert torch.equal(found[k], first)  # the FIRST maximal index
        ties += int(((sims[:, : k * per_shot] == best).sum(dim=1) > 1).sum())
    assert ties > 100  # the data really exercises ties
    # nothing in shot 4 (a copy of shot 1) is ever chosen: shot 1 comes first
    assert not ((found[4] >= 3 * per_shot) & (found[4] < 4 * per_shot)).any()


def test_forward_shots_equals_separate_forward_per_k():
    torch.manual_seed(0)
    channels, sizes = [5, 6, 7], [8, 4, 2]
    model = ResAD(channels, ModelConfig(num_embeddings=16, coupling_layers=2, pos_embed_dim=8)).eval()
    features = [torch.randn(3, c, s, s) for c, s in zip(channels, sizes)]
    bank = ReferenceBank.from_features([torch.randn(4, c, s, s) for c, s in zip(channels, sizes)])
    together = model.forward_shots(features, bank, [1, 3, 4])
    for k in (1, 3, 4):
        alone = model(features, bank.take(k))
        for a, b in zip(together[k][0] + together[k][1], alone[0] + alone[1]):
            assert torch.equal(a, b)
    assert not torch.equal(together[1][0][0], together[4][0][0])


def test_reference_groups_are_seeded_reorderings_of_the_shots():
    levels = [torch.arange(5 * 4 * 2, dtype=torch.float32).reshape(5 * 4, 2)]
    bank = ReferenceBank(levels, 5)
    groups = reference_groups(bank, 3, seed=7)
    assert len(groups) == 3 and groups[0] is bank
    again = reference_groups(bank, 3, seed=7)
    for group, same in zip(groups[1:], again[1:]):
        assert torch.equal(group.levels[0], same.levels[0])
        # each block of 4 rows is one of the original shots, each used once
        blocks = [int(group.levels[0][i * 4, 0].item()) // 8 for i in range(5)]
        assert sorted(blocks) == list(range(5))
        for i, b in enumerate(blocks):
            assert torch.equal(group.levels[0][i * 4:(i + 1) * 4], levels[0][b * 4:(b + 1) * 4])
    assert not torch.equal(groups[1].levels[0], groups[2].levels[0])


def test_f1_max_threshold_and_failure_cases_against_brute_force():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 7 + [1] * 9)
    scores = np.round(rng.random(16), 2)
    best_f1, best_t = -1.0, None
    for t in np.unique(scores):
        predicted = scores >= t
        tp = (predicted & (labels == 1)).sum()
        f1 = 2 * tp / (predicted.sum() + labels.sum())
        if f1 > best_f1:
            best_f1, best_t = f1, t
    assert f1_max_threshold(labels, scores) == pytest.approx(best_t)
    assert np.isnan(f1_max_threshold(np.zeros(4), np.arange(4.0)))

    chosen = failure_cases(labels, scores, 3)
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    assert chosen[0] == (int(anomalous[np.argmin(scores[anomalous])]), "lowest-anomalous")
    assert chosen[1] == (int(normal[np.argmax(scores[normal])]), "highest-normal")
    assert chosen[2] == (int(anomalous[np.argmax(scores[anomalous])]), "highest-anomalous")
    # the lowest-scoring anomalous image at the F1-max threshold is flagged: named for what it is, not a miss
    tied = np.array([0.1, 0.2, 0.5, 0.5, 0.9])
    found = failure_cases(np.array([0, 0, 0, 1, 1]), tied, 1)[0]
    assert found == (3, "lowest-anomalous") and f1_max_threshold(np.array([0, 0, 0, 1, 1]), tied) == 0.5
    from utils.report.results import heatmap_title
    title = heatmap_title("run", "cls", dict(threshold=0.5, score=0.5, path="x/crack/001.png", role=found[1]))
    assert "flagged at the class's F1-max threshold" in title and "miss" not in title
    many = failure_cases(labels, scores, 100)
    assert len(many) == 16 and len({i for i, _ in many}) == 16
    assert failure_cases(labels, scores, 0) == []


def test_results_table_gains_std_columns_for_reference_groups():
    rng = np.random.default_rng(1)
    groups = {c: [dict(zip(METRIC_NAMES, rng.random(len(METRIC_NAMES)))) for _ in range(3)] for c in "ab"}
    per_class = {c: ClassEvaluation({m: float(np.mean([g[m] for g in gs])) for m in METRIC_NAMES}, [], gs)
                 for c, gs in groups.items()}
    table = results_table(per_class)
    assert list(table.columns) == list(CSV_COLUMNS) + [f"{m} std" for m in METRIC_NAMES]
    for i, c in enumerate("ab"):
        for m in METRIC_NAMES:
            values = [g[m] for g in groups[c]]
            assert table.loc[i, f"{m} std"] == pytest.approx(np.std(values, ddof=1))
            assert table.loc[i, m] == pytest.approx(np.mean(values))
    class_means = [np.mean([groups[c][g]["Image AUC"] for c in "ab"]) for g in range(3)]
    assert table.iloc[-1]["Image AUC std"] == pytest.approx(np.std(class_means, ddof=1))
    single = results_table({c: ClassEvaluation(ev.metrics, [], ev.group_metrics[:1]) for c, ev in per_class.items()})
    assert list(single.columns) == list(CSV_COLUMNS)


# --------------------------------------------------------------------------- the script on generated data

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("multishot")
    root = generate_demo_dataset(str(base / "demo"), n_train=4, n_test_good=2, n_test_anomalous=3)
    refs = str(base / "refs")
    extract_reference_features("demo", root, refs, build_extractor(OFFLINE_BACKBONE), shots=2, classes=DEMO_UNSEEN)
    return {"root": root, "refs": refs, "base": base}


def script_args(demo, out, *extra, **overrides):
    options = {"--setting": "demo", "--train_dataset_dir": demo["root"], "--test_dataset_dir": demo["root"],
               "--test_ref_feature_dir": demo["refs"], "--backbone": OFFLINE_BACKBONE, "--train_ref_shot": 1,
               "--train_ref_pool": 2, "--pos_embed_dim": 16, "--epochs": 1, "--stage1_epochs": 1, "--batch_size": 16,
               "--eval_batch_size": 8, "--coupling_layers": 2, "--num_embeddings": 64, "--lr": 1e-4,
               "--num_workers": 0, "--device": "cpu", "--checkpoint_path": str(out), "--num_heatmaps": 3}
    options.update(overrides)
    return [str(x) for key, value in options.items() if value is not None for x in (key, value)] + [str(x) for x in extra]


def eval_args(demo, out, ckpt, *extra, **overrides):
    """--eval_only flags: the checkpoint gives the backbone and the model, nothing is trained."""
    options = {"--setting": "demo", "--test_dataset_dir": demo["root"], "--test_ref_feature_dir": demo["refs"],
               "--eval_batch_size": 8, "--num_workers": 0, "--device": "cpu", "--checkpoint_path": str(out),
               "--num_heatmaps": 3, "--eval_only": True, "--checkpoint": str(ckpt)}
    options.update(overrides)
    return [str(x) for key, value in options.items() if value is not None
            for x in ((key,) if value is True else (key, value))] + [str(x) for x in extra]


@pytest.fixture(scope="module")
def trained(demo):
    out = demo["base"] / "run"
    main_extended_multi_shot.main(script_args(demo, out, "--shots", "1", "2"))
    return out


@pytest.mark.slow
def test_multi_shot_script_writes_the_per_k_layout(trained):
    tables = {}
    for k in (1, 2):
        name = f"demo_{k}shot"
        folder = trained / name
        for suffix in ("_epoch1_metrics.csv", "_epoch1_metrics.json", "_epoch1_pixel_auroc.png", "_latest.pth"):
            assert (folder / f"{name}{suffix}").is_file(), f"{name}{suffix}"
        frame = pd.read_csv(folder / f"{name}_epoch1_metrics.csv")
        assert tuple(frame.columns) == CSV_COLUMNS
        assert frame["Class Name"].tolist() == list(DEMO_UNSEEN) + ["Mean"]
        tables[k] = frame
        heatmaps = sorted(os.listdir(folder / "heatmaps"))
        for cls in DEMO_UNSEEN:  # 2 normal and 3 anomalous test images: the three kinds exist
            for role in ("lowest-anomalous", "highest-normal", "highest-anomalous"):
                assert sum(h.startswith(f"{cls}_{role}_") for h in heatmaps) == 1, heatmaps
        with open(folder / f"{name}_epoch1_metrics.json") as f:
            assert json.load(f)["run"] == name
    # one and two reference shots give different maps, hence different pixel metrics
    pixel = ["Pixel AUC", "Pixel AP", "Pixel AUPRO"]
    assert not np.allclose(tables[1][pixel].to_numpy(), tables[2][pixel].to_numpy(), atol=1e-6, rtol=0)
    ckpt = torch.load(trained / "demo_2shot" / "demo_2shot_latest.pth", weights_only=False)
    assert ckpt["trained_on"] == {"setting": "demo", "source": "demo", "seen_classes": list(DEMO_SEEN),
                                  "backbone": OFFLINE_BACKBONE, "channels": [24, 40, 112],
                                  "layers": [1, 2, 3], "feature_levels": 3, "resize": "crop"}


def test_eval_only_reproduces_the_training_run_metrics(demo, trained, tmp_path):
    ckpt = trained / "demo_2shot" / "demo_2shot_latest.pth"
    main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, "--shots", "1", "2", "--num_heatmaps", 0))
    for k in (1, 2):
        name = f"demo_{k}shot"
        with open(trained / name / f"{name}_epoch1_metrics.csv") as f, open(tmp_path / name / f"{name}_epoch1_metrics.csv") as g:
            assert f.read() == g.read()
        assert not (tmp_path / name / f"{name}_latest.pth").exists()


def test_eval_only_with_reference_groups_reports_std(demo, trained, tmp_path):
    ckpt = trained / "demo_2shot" / "demo_2shot_latest.pth"
    main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, "--shots", "1", "--ref_groups", 2,
                                            "--num_heatmaps", 0, "--no_aupro"))
    one = pd.read_csv(tmp_path / "demo_1shot" / "demo_1shot_epoch1_metrics.csv")
    assert list(one.columns) == list(CSV_COLUMNS) + [f"{m} std" for m in METRIC_NAMES]
    # one shot drawn out of two, twice: the second draw is the other shot, so some std is positive
    assert (one["Pixel AUC std"] > 0).any()
    assert (one.drop(columns="Class Name").drop(columns=["Pixel AUPRO", "Pixel AUPRO std"]).notna()).all().all()


def test_eval_only_refuses_mismatches_in_one_line(demo, trained, tmp_path):
    ckpt = trained / "demo_2shot" / "demo_2shot_latest.pth"
    with pytest.raises(UserError, match="holds a model trained on demo .*--setting mvtec_to_btad is trained on mvtec"):
        main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, "--setting", "mvtec_to_btad"))
    other = tmp_path / "refs_other"
    shutil.copytree(demo["refs"], other)
    meta_path = other / DEMO_UNSEEN[0] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, backbone="wide_resnet50_2")))
    with pytest.raises(UserError, match=f"wide_resnet50_2, but --checkpoint .* --backbone {OFFLINE_BACKBONE}"):
        main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, "--test_ref_feature_dir", other))
    with pytest.raises(UserError, match=r"--checkpoint .*: the model was trained with --resize crop, this run "
                                        r"uses --resize full; pass --resize crop"):
        main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, "--resize", "full"))
    with pytest.raises(UserError, match=r"--shots 3: .* holds only 2 shots"):
        main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, "--shots", "1", "3"))
    with pytest.raises(UserError, match="--eval_only: give the trained model with --checkpoint"):
        main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, **{"--checkpoint": None}))
    with pytest.raises(UserError, match="--checkpoint .*only used with --eval_only"):
        main_extended_multi_shot.main(script_args(demo, tmp_path, "--checkpoint", ckpt))
    assert not any(files for folder, _, files in os.walk(tmp_path) if "refs_other" not in folder)


def test_eval_only_refuses_the_flags_it_would_ignore(demo, trained, tmp_path):
    ckpt = trained / "demo_2shot" / "demo_2shot_latest.pth"
    for flags, named in ((("--coupling_layers", 4), "--coupling_layers"), (("--epochs", 3, "--lr", 1e-3), "--epochs, --lr"),
                         (("--train_dataset_dir", "/nonexistent"), "--train_dataset_dir"),
                         (("--backbone", "resnet18"), "--backbone"), (("--resume",), "--resume"),
                         (("--baseline", "knn"), "--baseline")):
        with pytest.raises(UserError, match=f"^{named}: not used here|^--baseline: not with --eval_only") as err:
            main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, *flags))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="^--num_ref_shot: not used here|unrecognized arguments: --num_ref_shot"):
        main_extended_multi_shot.main(eval_args(demo, tmp_path, ckpt, "--num_ref_shot", 2))  # --shots here
    assert not any(files for _, _, files in os.walk(tmp_path))
