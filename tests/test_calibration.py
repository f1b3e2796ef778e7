"""A class calibrated from its references (models/calibration.py, utils/formats/calibration.py) against
references computed here: brute-force self-excluded matching, each reference scored against a bank of the
others, moments and maxima taken directly; and the point of it: a score that does not depend on the others."""
import json

import numpy as np
import pytest
import torch

from models.anomaly_map import image_scores, resad_maps
from models.calibration import (_self_excluded_match, calibrate, calibrate_baseline, calibrate_model,
                                reference_nearest, reference_outputs)
from models.matching import ReferenceBank
from models.resad import LevelScores, ModelConfig, ResAD
from utils.formats import calibration as calibration_file

CHANNELS, SIZES = [5, 6, 7], [8, 6, 4]
GRIDS = [(s, s) for s in SIZES]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    np.random.seed(0)
    return ResAD(CHANNELS, ModelConfig(num_embeddings=16, coupling_layers=2, pos_embed_dim=8)).eval()


def _features(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, s, s, generator=generator) for c, s in zip(CHANNELS, SIZES)]


def test_self_excluded_match_is_the_brute_force_best_outside_the_neighbourhood():
    feature = torch.randn(1, 4, 5, 6)
    for radius in (0, 1, 2):
        matched, distance = _self_excluded_match(feature, radius)
        rows = feature[0].permute(1, 2, 0).reshape(-1, 4).double().numpy()
        for p in range(30):
            py, px = divmod(p, 6)
            allowed = [q for q in range(30) if max(abs(q // 6 - py), abs(q % 6 - px)) > radius]
            cos = [rows[p] @ rows[q] / np.linalg.norm(rows[p]) / np.linalg.norm(rows[q]) for q in allowed]
            best = allowed[int(np.argmax(cos))]
            assert np.allclose(matched[0, :, py, px].double().numpy(), rows[best])
            assert distance[0, py, px].item() == pytest.approx(min(np.linalg.norm(rows[p] - rows[q]) for q in allowed),
                                                               rel=1e-5)


def test_leave_one_out_scores_each_reference_against_a_bank_of_the_others(model):
    refs = _features(3, 1)
    bank = ReferenceBank.from_features(refs)
    got = reference_outputs(model, bank, GRIDS, nearest_levels=[1, 2])
    for i in range(3):
        others = ReferenceBank.from_features([f[[j for j in range(3) if j != i]] for f in refs])
        expected = model([f[i:i + 1] for f in refs], others)   # the plain forward: one bank, one matching
        for level in range(3):
            assert torch.allclose(got.logps[level][i], expected.logps[level][0], atol=1e-5)
            assert torch.allclose(got.distances[level][i], expected.distances[level][0], atol=1e-5)
        assert got.nearest[0] is None
        for level in (1, 2):
            queries = refs[level][i].permute(1, 2, 0).reshape(-1, CHANNELS[level]).double()
            rows = torch.cat([refs[level][j].permute(1, 2, 0).reshape(-1, CHANNELS[level]) for j in range(3) if j != i])
            expected_d = torch.cdist(queries, rows.double()).min(dim=1).values.reshape(SIZES[level], SIZES[level])
            assert torch.allclose(got.nearest[level][i].double(), expected_d, atol=1e-5)


def test_calibration_holds_the_moments_and_maxima_of_the_reference_outputs(model):
    bank = ReferenceBank.from_features(_features(4, 2))
    found = calibrate_model(model, bank, GRIDS, ["coarse_knn", "fused", "standardized"], size=32, sigma=2.0)
    outputs = reference_outputs(model, bank, GRIDS, nearest_levels=[1, 2])
    assert found.shots == 4 and found.rule == "leave_one_out"
    nll, knn = found.statistics["coarse_knn"]
    for term, moments, values in ((0, nll, [-lp for lp in outputs.logps]), (1, knn, outputs.nearest)):
        for level, value in enumerate(values[1:]):   # the coarse map leaves out the finest level
            v = value.double().numpy().ravel()
            assert moments.mean[level] == pytest.approx(v.mean(), rel=1e-9)
            assert moments.std[level] == pytest.approx(v.std(), rel=1e-6)
    fused = found.statistics["fused"]
    assert fused.level_max == pytest.approx([float(lp.max()) for lp in outputs.logps])
    for kind in ("coarse_knn", "fused"):
        maps = resad_maps(outputs, kind, size=32, sigma=2.0, statistics=found.statistics[kind])
        for rule in ("max", "mean_top1pct"):
            expected = image_scores(maps, rule).double().numpy()
            assert np.allclose(found.reference_scores[kind][rule], expected, rtol=1e-6)
            assert found.threshold(kind, rule) == pytest.approx(expected.max())
            assert found.threshold(kind, rule, 0.5) == pytest.approx(np.quantile(expected, 0.5))
    # the baseline's calibration needs no model and agrees with the model's nearest distances
    baseline = calibrate_baseline(bank, GRIDS, ["coarse_knn_standardized"], size=32, sigma=2.0)
    assert baseline.statistics["coarse_knn_standardized"][0] == knn


def test_one_reference_is_calibrated_against_itself_outside_each_neighbourhood(model):
    bank = ReferenceBank.from_features(_features(1, 3))
    found = calibrate_model(model, bank, GRIDS, ["coarse_knn"], size=32, sigma=2.0)
    assert found.shots == 1 and found.rule == "self_excluded"
    nearest = reference_nearest(bank, GRIDS, [1, 2])
    assert nearest[0] is None
    for level in (1, 2):
        feature = bank.levels[level].reshape(1, SIZES[level], SIZES[level], -1).permute(0, 3, 1, 2)
        assert torch.allclose(nearest[level], _self_excluded_match(feature)[1])
        assert found.statistics["coarse_knn"][1].mean[level - 1] == pytest.approx(float(nearest[level].double().mean()))
    assert np.isfinite(found.threshold("coarse_knn", "max"))


@pytest.mark.parametrize("kind", ["coarse_knn", "fused"])
def test_a_calibrated_score_does_not_depend_on_the_other_images(model, kind):
    bank = ReferenceBank.from_features(_features(4, 4))
    found = calibrate_model(model, bank, GRIDS, [kind], size=32, sigma=2.0)
    images = _features(6, 5)
    nearest = [1, 2] if kind == "coarse_knn" else None

    def scores(batch, statistics):
        outputs = model.forward_shots(batch, bank, [4], nearest_levels=nearest)[4]
        return image_scores(resad_maps(outputs, kind, size=32, sigma=2.0, statistics=statistics), "max").numpy()

    together = scores(images, found.statistics[kind])
    alone = np.concatenate([scores([f[i:i + 1] for f in images], found.statistics[kind]) for i in range(6)])
    assert np.allclose(together, alone, rtol=1e-5)
    halves = np.concatenate([scores([f[:3] for f in images], None), scores([f[3:] for f in images], None)])
    assert not np.allclose(scores(images, None), halves, rtol=1e-3)   # the set's statistics: they do


def test_calibration_file_round_trips_and_refuses_another_model_or_references(model, tmp_path):
    bank = ReferenceBank.from_features(_features(3, 6))
    found = calibrate_model(model, bank, GRIDS, ["coarse_knn", "fused"], size=32, sigma=2.0)
    identity = {"model": calibration_file.model_fingerprint(model.state_dict()),
                "references": calibration_file.bank_fingerprint(bank), "shots": 3, "fdm_alpha": 0.4}
    path = calibration_file.save(str(tmp_path), found, identity)
    loaded, why = calibration_file.load(str(tmp_path), identity, ["coarse_knn", "fused"])
    assert why == "" and loaded == found
    other_bank = ReferenceBank.from_features(_features(3, 7))
    other = dict(identity, references=calibration_file.bank_fingerprint(other_bank))
    assert calibration_file.load(str(tmp_path), other, ["fused"]) == (None, f"{path} was made for another references")
    assert calibration_file.load(str(tmp_path), identity, ["standardized"])[0] is None
    changed = {name: value.clone() for name, value in model.state_dict().items()}
    name = next(n for n in changed if changed[n].is_floating_point())
    changed[name].view(-1)[0] += 1e-3
    assert calibration_file.model_fingerprint(changed) != identity["model"]
    with open(path) as f:
        plain = json.load(f)
    plain["version"] = 99
    with open(path, "w") as f:
        json.dump(plain, f)
    assert "version" in calibration_file.load(str(tmp_path), identity, ["fused"])[1]
