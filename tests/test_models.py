"""Unit tests of the model pieces against independent references computed here."""
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from models.anomaly_map import anomaly_maps, gaussian_blur
from models.constraintor import FeatureConstraintor
from models.flow import (LevelFlow, PositionConditionedSubnet, grid_coordinates, log_likelihoods,
                         positional_encoding_2d)
from models.losses import (BoundaryAverager, bgspp_loss, flow_loss, focal_loss, normal_boundary, occ_loss)
from models.matching import Matcher, ReferenceBank, match_references, nearest_reference_indices
from models.positions import flatten_positions, unflatten_positions
from models.residual import match_feature_distribution, residual_features
from models.vq import VectorQuantizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# --------------------------------------------------------------------------- matching and residuals

def test_nearest_reference_matches_brute_force_cosine():
    queries = torch.randn(300, 16)
    bank = torch.randn(500, 16) * torch.rand(500, 1) * 5  # rows of very different norms
    got = nearest_reference_indices(queries, F.normalize(bank, dim=1)).numpy()
    q, b = queries.double().numpy(), bank.double().numpy()
    expected = []
    for row in q:  # brute force, one query at a time
        cos = [row @ ref / (np.linalg.norm(row) * np.linalg.norm(ref)) for ref in b]
        expected.append(int(np.argmax(cos)))
    assert (got == np.array(expected)).all()


def test_nearest_reference_chunking_gives_same_answer():
    queries, bank = torch.randn(257, 8), F.normalize(torch.randn(100, 8), dim=1)
    whole = nearest_reference_indices(queries, bank)
    blocks = Matcher(blocks={"cpu": 700, "cuda": 700})  # blocks of 7 rows
    assert torch.equal(blocks.nearest(queries, bank), whole)
    # tiles of 7 query rows x at most 30 bank rows (4 column tiles of 25, merged in order)
    tiles = Matcher(tiles={"cpu": (7 * 25, 30), "cuda": (7 * 25, 30)})
    assert torch.equal(tiles.nearest(queries, bank), whole)
    assert torch.equal(whole, torch.argmax(F.normalize(queries, dim=1) @ bank.t(), dim=1))


def test_bank_is_image_major_and_cuts_to_first_shots():
    feats = [torch.randn(3, 4, 5, 6), torch.randn(3, 7, 2, 3)]
    bank = ReferenceBank.from_features(feats)
    assert bank.num_shots == 3 and bank.channels == [4, 7]
    # row r of image i at (y, x) is feats[i, :, y, x]
    assert torch.equal(bank.levels[0][1 * 30 + 2 * 6 + 5], feats[0][1, :, 2, 5])
    two = bank.take(2)
    assert two.num_shots == 2 and two.levels[0].shape == (60, 4)
    assert torch.equal(two.levels[1], ReferenceBank.from_features([f[:2] for f in feats]).levels[1])
    with pytest.raises(ValueError):
        bank.take(4)


def test_flatten_roundtrip():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(unflatten_positions(flatten_positions(x), 2, 4, 5), x)


def test_match_references_and_residual_modes():
    feats = [torch.randn(2, 6, 4, 4)]
    refs = [torch.randn(3, 6, 4, 4)]
    bank = ReferenceBank.from_features(refs)
    matched = match_references(feats, bank)[0]
    rows = flatten_positions(refs[0])
    for b in range(2):
        for y in range(4):
            for x in range(4):
                cos = F.cosine_similarity(feats[0][b, :, y, x][None], rows)
                assert torch.equal(matched[b, :, y, x], rows[cos.argmax()])
    sq = residual_features(feats, [matched], "squared")[0]
    diff = residual_features(feats, [matched], "difference")[0]
    assert torch.allclose(sq, (feats[0] - matched) ** 2) and torch.allclose(diff, feats[0] - matched)
    with pytest.raises(ValueError):
        residual_features(feats, [matched], "abs")


def test_efdm_hand_made_case():
    source = torch.tensor([3.0, 1.0, 2.0, 5.0]).view(1, 1, 2, 2)
    target = torch.tensor([10.0, 40.0, 30.0, 20.0]).view(1, 1, 2, 2)
    # ranks of source: 1 -> 10, 2 -> 20, 3 -> 30, 5 -> 40
    full = match_feature_distribution(source, target, alpha=0.0)
    assert full.flatten().tolist() == [30.0, 10.0, 20.0, 40.0]
    assert torch.equal(match_feature_distribution(source, target, alpha=1.0), source)
    part = match_feature_distribution(source, target, alpha=0.4).flatten()
    expected = torch.tensor([3 + 27 * 0.6, 1 + 9 * 0.6, 2 + 18 * 0.6, 5 + 35 * 0.6])
    assert torch.allclose(part, expected)


def test_efdm_is_per_channel_and_per_image():
    source, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = match_feature_distribution(source, target, alpha=0.0)
    for b in range(2):
        for c in range(3):
            assert torch.allclose(out[b, c].flatten().sort().values, target[b, c].flatten().sort().values)
            # the order of the source is kept
            assert torch.equal(out[b, c].flatten().argsort(), source[b, c].flatten().argsort())


# --------------------------------------------------------------------------- VQ

def test_vq_nearest_and_loss_against_direct_computation():
    vq = VectorQuantizer(32, 5)
    with torch.no_grad():
        vq.codebook.weight.normal_()
    residual = torch.randn(2, 5, 3, 3)
    mask = torch.zeros(2, 3, 3)
    mask[1, 0, :] = 1
    rows = flatten_positions(residual)
    dist = torch.cdist(rows.double(), vq.codebook.weight.double())
    assert torch.equal(vq.nearest(rows), dist.argmin(dim=1))
    normal = rows[mask.reshape(-1) == 0]
    q = vq.codebook.weight[torch.cdist(normal, vq.codebook.weight).argmin(1)]
    expected = ((q - normal) ** 2).mean() * 1.25  # both terms have the same value
    assert torch.allclose(vq.loss(residual, mask), expected)
    quantized = vq.quantize(residual)
    assert torch.equal(flatten_positions(quantized), vq.codebook.weight[dist.argmin(1)])


def test_vq_codebook_init_and_gradient_only_on_codebook_term():
    vq = VectorQuantizer(1536, 8)
    w = vq.codebook.weight
    assert w.abs().max() <= 1 / 1536 and w.std() > 0
    residual = torch.randn(1, 8, 2, 2, requires_grad=True)
    vq.loss(residual, torch.zeros(1, 2, 2)).backward()
    assert vq.codebook.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- losses

def _softplus(x):
    return math.log1p(math.exp(x))


def test_occ_loss_hand_computed_normal_only():
    # norms 0 (inside r_min), 4 (outside r_max): A = sqrt(n + 1) - 1
    e = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    mask = torch.zeros(2)
    a_far = math.sqrt(5) - 1
    r_max, r_min = 0.4, 0.396
    outer = _softplus(a_far - r_max) * math.exp(a_far - r_max)
    inner = _softplus(r_min - 0.0) * math.exp(r_min - 0.0)
    got = occ_loss(e, e.clone(), mask).item()
    assert got == pytest.approx(outer + inner, rel=1e-5)


def test_occ_loss_hand_computed_with_anomaly():
    e = torch.tensor([[0.0, 3.0], [0.3, 0.0]])
    t = torch.tensor([[0.0, 2.0], [9.0, 9.0]])
    mask = torch.tensor([0.0, 1.0])
    a_n, a_a = math.sqrt(4) - 1, math.sqrt(1.3) - 1
    r_max = min(0.9 * a_a, 0.4)
    r_min = 0.99 * r_max
    normal = _softplus(a_n - r_max) * math.exp(a_n - r_max)       # a_n = 1 > r_max
    mse = (0.3 - 9) ** 2 / 2 + (0 - 9) ** 2 / 2
    cos = 0.3 * 9 / (0.3 * math.hypot(9, 9))
    boundary = r_max + 0.1
    barrier = _softplus(boundary - a_a) * math.exp(boundary - a_a)  # a_a < boundary
    assert r_min < a_n
    assert occ_loss(e, t, mask).item() == pytest.approx(normal + mse + (1 - cos) + barrier, rel=1e-5)


def test_focal_loss_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    target = torch.tensor([0, 0])
    s = 1e-5
    pts = [0.9 * (1 - s) + 0.1 * s + s, 0.3 * (1 - s) + 0.7 * s + s]
    expected = np.mean([-(1 - p) ** 2 * math.log(p) for p in pts])
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-5)


def test_normal_boundary_and_averager():
    logp = torch.arange(100, dtype=torch.float32)
    mask = torch.zeros(100)
    mask[:10] = 1  # anomalies are ignored: normal values 10..99, 5 % of 90 -> index 4 -> 14
    assert normal_boundary(logp, mask, 0.05).item() == 14.0
    assert normal_boundary(logp, torch.ones(100), 0.05) is None
    avg = BoundaryAverager(2)
    avg.update(0, torch.tensor(10.0))
    avg.update(0, torch.tensor(20.0))
    avg.update(1, None)
    assert float(avg.get(0)) == pytest.approx(0.9 * 1.0 + 0.1 * 20.0)
    assert avg.get(1) == 0.0
    restored = BoundaryAverager(2)
    restored.load_state_dict(avg.state_dict())
    assert restored.get(0) == pytest.approx(float(avg.get(0)))


def test_bgspp_and_flow_loss_hand_computed():
    logp = torch.tensor([-1.0, -3.0, -0.5, -2.0])
    logp_a = torch.tensor([-2.0, -1.0, -1.0, -0.5])
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b_n, b_a = -2.0, -2.1
    # -logsigmoid(-v) = softplus(v); normal -3 <= b_n violates by 1, anomalies -0.5 and -2.0 >= b_a
    pull = _softplus(1.0)
    push = (_softplus(-0.5 + 2.1) + _softplus(-2.0 + 2.1)) / 2
    assert bgspp_loss(logp, mask, b_n, b_a).item() == pytest.approx(pull + push, rel=1e-5)
    stage1 = flow_loss(logp, logp_a, torch.zeros(4))
    assert stage1.item() == pytest.approx(np.mean([_softplus(-v) for v in logp.tolist()]), rel=1e-5)
    probs = torch.softmax(torch.stack([logp, logp_a], -1), -1)
    expected = (np.mean([_softplus(1.0), _softplus(3.0)]) + np.mean([_softplus(1.0), _softplus(0.5)])
                + focal_loss(probs, mask).item() + 2.0 * (pull + push))
    got = flow_loss(logp, logp_a, mask, (torch.tensor(b_n), torch.tensor(b_a)), bgspp_lambda=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # only anomalies in a mini-batch: no NaN from an empty normal set
    assert torch.isfinite(flow_loss(logp, logp_a, torch.ones(4), (torch.tensor(b_n), torch.tensor(b_a))))


# --------------------------------------------------------------------------- flow

def test_positional_encoding_formula():
    pe = positional_encoding_2d(16, 3, 5)
    half = 8
    for y in range(3):
        for x in range(5):
            for i in range(half // 2):
                f = 10000 ** (-(2 * i) / half)
                assert pe[2 * i, y, x].item() == pytest.approx(math.sin(x * f), abs=1e-6)
                assert pe[2 * i + 1, y, x].item() == pytest.approx(math.cos(x * f), abs=1e-6)
                assert pe[half + 2 * i, y, x].item() == pytest.approx(math.sin(y * f), abs=1e-6)
                assert pe[half + 2 * i + 1, y, x].item() == pytest.approx(math.cos(y * f), abs=1e-6)


def test_position_subnet_equals_linear_on_concatenated_encoding():
    sub = PositionConditionedSubnet(12 + 2, 24, pos_embed_dim=256)
    pe = positional_encoding_2d(256, 14, 20)
    x = torch.randn(64, 12)
    cols, rows = torch.randint(0, 20, (64,)), torch.randint(0, 14, (64,))
    reference = sub.fc2(torch.relu(sub.fc1(torch.cat([x, pe[:, rows, cols].t()], dim=1))))
    got = sub(torch.cat([x, cols[:, None].float(), rows[:, None].float()], dim=1))
    assert torch.allclose(got, reference, atol=1e-5)
    assert sub.fc1.weight.shape == (2 * (12 + 256), 12 + 256)


def test_log_likelihoods_formula():
    z = torch.tensor([[0.0, 1.0, 2.0]])
    log_det = torch.tensor([0.5])
    logp, logp_a = log_likelihoods(z, log_det)
    c = 3
    assert logp.item() == pytest.approx((-c * 0.5 * math.log(2 * math.pi) - 0.5 * 5 + 0.5) / c, rel=1e-6)
    assert logp_a.item() == pytest.approx((-c * 0.5 * math.log(2 * math.pi) - 0.5 * 2 + 0.5) / c, rel=1e-6)


def test_flow_density_integrates_to_one():
    # exp(C * logp) is a density: integrate a random (untrained) 2-D flow on a grid.
    flow = LevelFlow(2, coupling_layers=4, arch="flow_model")
    for module in flow.modules():
        if isinstance(module, torch.nn.Linear):  # random subnet weights: a non-trivial, position-dependent Jacobian
            torch.nn.init.normal_(module.weight, std=0.3)
    step = 0.04
    axis = torch.arange(-8, 8, step) + step / 2
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        logp, _ = log_likelihoods(*flow(grid, None))
    assert (logp * 2).exp().sum().item() * step * step == pytest.approx(1.0, abs=0.01)


def test_conditional_flow_shapes_and_condition_matters():
    flow = LevelFlow(6, coupling_layers=2, pos_embed_dim=16)
    rows = torch.randn(10, 6)
    z1, ld1 = flow(rows, torch.zeros(10, 2))
    z2, _ = flow(rows, torch.full((10, 2), 3.0))
    assert z1.shape == (10, 6) and ld1.shape == (10,)
    assert not torch.allclose(z1, z2)


def test_grid_coordinates_row_major():
    coords = grid_coordinates(2, 3)
    assert coords.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]


def test_constraintor_shapes():
    c = FeatureConstraintor([4, 8])
    out = c([torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)])
    assert [tuple(o.shape) for o in out] == [(2, 4, 6, 6), (2, 8, 3, 3)] and (out[0] >= 0).all()


# --------------------------------------------------------------------------- anomaly maps

def test_gaussian_blur_matches_scipy():
    maps = torch.rand(3, 40, 50)
    expected = np.stack([ndi.gaussian_filter(m, sigma=4) for m in maps.numpy().astype(np.float64)])
    assert np.abs(gaussian_blur(maps, 4.0).numpy() - expected).max() < 1e-5


def test_anomaly_maps_follow_the_spec():
    logps = [torch.randn(5, 8, 8) - 3, torch.randn(5, 4, 4) - 3]
    probs = [torch.rand(5, 8, 8), torch.rand(5, 4, 4)]
    size = 40
    # direct computation: per level exp(logp - max), bilinear (align_corners), sum, max - map;
    # map 2 = mean of up-sampled probs; each smoothed with scipy, then averaged.
    def up(t):
        return F.interpolate(t[:, None], size=(size, size), mode="bilinear", align_corners=True)[:, 0].numpy()
    normal = sum(up((lp - lp.max()).exp()) for lp in logps)
    map1 = normal.max() - normal
    map2 = sum(up(p) for p in probs) / 2
    smooth = lambda m: np.stack([ndi.gaussian_filter(x.astype(np.float64), 4) for x in m])  # noqa: E731
    expected = (smooth(map1) + smooth(map2)) / 2
    got = anomaly_maps(logps, probs, size=size, sigma=4, chunk=2).numpy()
    assert np.abs(got - expected).max() < 1e-5


def _scipy_up(maps, size):
    """Bilinear up-sampling with corners on corners (align_corners), by scipy: an independent reference."""
    return np.stack([ndi.zoom(m.astype(np.float64), (size / m.shape[0], size / m.shape[1]), order=1,
                              mode="nearest", grid_mode=False) for m in maps])


def test_standardized_map_follows_its_definition():
    from models.anomaly_map import standardized_maps

    torch.manual_seed(1)
    logps = [torch.randn(4, 8, 8) * 5 - 30, torch.randn(4, 4, 4) - 3]
    norms = [torch.rand(4, 8, 8) * 3, torch.rand(4, 4, 4) * 0.1]
    size = 32
    total = 0.0
    for lp, nm in zip(logps, norms):  # numpy moments over every position of the set, per level
        nll, norm = -lp.numpy().astype(np.float64), nm.numpy().astype(np.float64)
        total = total + _scipy_up((nll - nll.mean()) / nll.std(), size) + _scipy_up((norm - norm.mean()) / norm.std(), size)
    expected = np.stack([ndi.gaussian_filter(m, 2.0) for m in total])
    got = standardized_maps([[-lp for lp in logps], norms], size=size, sigma=2.0, chunk=3).numpy()
    assert np.abs(got - expected).max() < 1e-4


def _coarse_reference(logps, distances, size, sigma):
    """The coarse maps by hand: -logp and a distance, each standardized over the set with numpy moments,
    on levels 1 and 2 only, up-sampled by scipy, summed and smoothed."""
    total = 0.0
    for lp, dist in zip(logps[1:], distances[1:]):
        nll, d = -lp.numpy().astype(np.float64), dist.numpy().astype(np.float64)
        total = total + _scipy_up((nll - nll.mean()) / nll.std(), size) + _scipy_up((d - d.mean()) / d.std(), size)
    return np.stack([ndi.gaussian_filter(m, sigma) for m in total])


def test_coarse_residual_map_leaves_out_the_finest_level():
    from models.anomaly_map import resad_maps
    from models.resad import LevelScores

    torch.manual_seed(3)
    shapes = [(4, 16, 16), (4, 8, 8), (4, 4, 4)]
    logps = [torch.randn(*s) * 2 - 5 for s in shapes]
    distances = [torch.rand(*s) * (i + 1) for i, s in enumerate(shapes)]
    distances[0][0, 3, 3] = 1e3  # an outlier on the finest level must not show in the map
    outputs = LevelScores(logps, [torch.rand(*s) for s in shapes], [torch.rand(*s) for s in shapes], distances)
    size = 32
    expected = _coarse_reference(logps, distances, size, sigma=2.0)
    got = resad_maps(outputs, "coarse_residual", size=size, sigma=2.0).numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_coarse_knn_map_sums_the_coarse_nll_and_nearest_reference_distances():
    from models.anomaly_map import needs_nearest, resad_maps
    from models.resad import LevelScores

    torch.manual_seed(4)
    shapes = [(3, 16, 16), (3, 8, 8), (3, 4, 4)]
    logps = [torch.randn(*s) * 2 - 5 for s in shapes]
    nearest = [torch.rand(*s) * (i + 2) for i, s in enumerate(shapes)]
    nearest[0][1, 2, 2] = 1e3  # the finest level is left out
    rest = [torch.rand(*s) for s in shapes]
    outputs = LevelScores(logps, rest, rest, rest, nearest)
    size = 32
    expected = _coarse_reference(logps, nearest, size, sigma=2.0)
    got = resad_maps(outputs, "coarse_knn", size=size, sigma=2.0).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert needs_nearest("coarse_knn") and not needs_nearest("coarse_residual") and not needs_nearest("fused")
    with pytest.raises(ValueError, match="nearest"):
        resad_maps(outputs._replace(nearest=[]), "coarse_knn", size=size)


def test_the_baseline_under_resads_rule_standardizes_the_same_levels_with_given_statistics():
    """knn_normalized of a coarse map: the distances of levels 1 and 2 alone, standardized with numpy moments
    (the set's), or with fixed statistics (a calibration's), which make each image's map its own."""
    from models.anomaly_map import LevelMoments, nearest_levels, normalized_baseline, resad_maps
    from models.resad import LevelScores

    torch.manual_seed(6)
    shapes = [(3, 16, 16), (3, 8, 8), (3, 4, 4)]
    nearest = [torch.rand(*s) * (i + 2) for i, s in enumerate(shapes)]
    outputs = LevelScores([], [], [], [], nearest=[None] + nearest[1:])   # the finest level not searched
    assert normalized_baseline("coarse_knn") == "coarse_knn_standardized" and normalized_baseline("fused") is None
    assert normalized_baseline("standardized") == "knn_standardized"
    assert nearest_levels(["coarse_knn"], 3) == [1, 2] and nearest_levels(["knn", "fused"], 3) == [0, 1, 2]
    assert nearest_levels(["fused", "coarse_residual"], 3) is None
    size, total = 32, 0.0
    for d in nearest[1:]:
        d = d.numpy().astype(np.float64)
        total = total + _scipy_up((d - d.mean()) / d.std(), size)
    expected = np.stack([ndi.gaussian_filter(m, 2.0) for m in total])
    got = resad_maps(outputs, "coarse_knn_standardized", size=size, sigma=2.0).numpy()
    assert np.abs(got - expected).max() < 1e-4
    fixed = [LevelMoments([1.0, 2.0], [0.5, 4.0])]
    alone = resad_maps(outputs._replace(nearest=[None] + [d[:1] for d in nearest[1:]]), "coarse_knn_standardized",
                       size=size, sigma=2.0, statistics=fixed).numpy()
    by_hand = sum(_scipy_up((d[:1].numpy().astype(np.float64) - m) / sd, size)
                  for d, m, sd in zip(nearest[1:], fixed[0].mean, fixed[0].std))
    assert np.abs(alone[0] - ndi.gaussian_filter(by_hand[0], 2.0)).max() < 1e-4


def test_forward_shots_nearest_is_the_brute_force_nearest_reference_distance():
    from models.matching import ReferenceBank
    from models.resad import ModelConfig, ResAD

    torch.manual_seed(5)
    channels, sizes = [5, 6], [6, 3]
    model = ResAD(channels, ModelConfig(num_embeddings=16, coupling_layers=2, pos_embed_dim=8)).eval()
    features = [torch.randn(2, c, s, s) for c, s in zip(channels, sizes)]
    references = [torch.randn(4, c, s, s) for c, s in zip(channels, sizes)]
    bank = ReferenceBank.from_features(references)
    scores = model.forward_shots(features, bank, [1, 4], nearest_levels=[0, 1])
    coarse = model.forward_shots(features, bank, [1, 4], nearest_levels=[1])
    plain = model.forward_shots(features, bank, [1, 4])
    for k in (1, 4):
        assert len(plain[k].nearest) == 0 and all(torch.equal(a, b) for a, b in zip(plain[k].logps, scores[k].logps))
        assert coarse[k].nearest[0] is None and torch.equal(coarse[k].nearest[1], scores[k].nearest[1])
        for feature, refs, got in zip(features, references, scores[k].nearest):
            queries = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).double()
            rows = refs[:k].permute(0, 2, 3, 1).reshape(-1, refs.shape[1]).double()
            expected = torch.cdist(queries, rows).min(dim=1).values.reshape(got.shape)
            assert torch.allclose(got.double(), expected, atol=1e-5)


def test_standardized_statistics_of_parts_equal_the_whole():
    from models.anomaly_map import standardized_maps, standardized_statistics

    torch.manual_seed(2)
    logps = [torch.randn(9, 8, 8) * 3, torch.randn(9, 4, 4)]
    norms = [torch.rand(9, 8, 8), torch.rand(9, 4, 4)]
    parts = [slice(i, i + 4) for i in range(0, 9, 4)]
    statistics = standardized_statistics([([lp[p] for lp in logps], [nm[p] for nm in norms]) for p in parts])
    whole = standardized_maps([logps, norms], size=32, sigma=2.0)
    pieces = torch.cat([standardized_maps([[lp[p] for lp in logps], [nm[p] for nm in norms]], size=32, sigma=2.0,
                                          statistics=statistics) for p in parts])
    assert torch.allclose(pieces, whole, atol=1e-5)


def test_residual_distance_is_the_distance_to_the_matched_reference():
    from models.residual import residual_distance

    features, matched = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    direct = (features - matched).pow(2).sum(dim=1).sqrt()
    for mode in ("squared", "difference"):
        got = residual_distance(residual_features([features], [matched], mode)[0], mode)
        assert torch.allclose(got, direct, atol=1e-6)


def test_single_maps_are_the_halves_of_the_fused_map():
    """normality alone = G(max - sum_l exp(logp_l - max_l)), abnormality alone = G(mean of probs); fused = their mean."""
    torch.manual_seed(3)
    logps = [torch.randn(5, 8, 8) - 3, torch.randn(5, 4, 4) - 3]
    probs = [torch.rand(5, 8, 8), torch.rand(5, 4, 4)]
    smooth = lambda m: np.stack([ndi.gaussian_filter(x, 2.0) for x in m])  # noqa: E731
    normal = sum(_scipy_up((lp - lp.max()).exp().numpy(), 32) for lp in logps)
    normality = anomaly_maps(logps, probs, size=32, sigma=2.0, kind="normality").numpy()
    abnormality = anomaly_maps(logps, probs, size=32, sigma=2.0, kind="abnormality").numpy()
    assert np.abs(normality - smooth(normal.max() - normal)).max() < 1e-4
    assert np.abs(abnormality - smooth(sum(_scipy_up(p.numpy(), 32) for p in probs) / 2)).max() < 1e-4
    fused = anomaly_maps(logps, probs, size=32, sigma=2.0).numpy()
    assert np.abs(fused - (normality + abnormality) / 2).max() < 1e-5


def test_image_scores_max_and_top_percent_mean():
    from models.anomaly_map import image_scores

    maps = torch.rand(3, 20, 20)  # 400 pixels: the top 1 % are the 4 largest
    top = np.sort(maps.numpy().reshape(3, -1), axis=1)[:, -4:].mean(axis=1)
    assert np.allclose(image_scores(maps, "mean_top1pct").numpy(), top, atol=1e-6)
    assert torch.equal(image_scores(maps, "max"), maps.reshape(3, -1).max(dim=1).values)
    with pytest.raises(ValueError, match="unknown image score"):
        image_scores(maps, "median")


def test_anomaly_maps_of_a_set_scored_in_parts_equal_the_whole():
    """The set's statistics (per-level maximum logp, maximum normality) make parts score like the whole."""
    from models.anomaly_map import map_statistics

    torch.manual_seed(0)
    logps = [torch.randn(10, 8, 8) * 3, torch.randn(10, 4, 4)]
    probs = [torch.rand(10, 8, 8), torch.rand(10, 4, 4)]
    whole = anomaly_maps(logps, probs, size=32, sigma=2.0, chunk=3)
    parts = [slice(i, i + 3) for i in range(0, 10, 3)]
    statistics = map_statistics([[lp[p] for lp in logps] for p in parts], size=32)
    assert statistics.level_max == [float(lp.max()) for lp in logps]
    pieces = torch.cat([anomaly_maps([lp[p] for lp in logps], [pr[p] for pr in probs], size=32, sigma=2.0,
                                     statistics=statistics) for p in parts])
    assert torch.equal(pieces, whole)
    alone = anomaly_maps([lp[parts[0]] for lp in logps], [pr[parts[0]] for pr in probs], size=32, sigma=2.0)
    assert not torch.equal(alone, whole[parts[0]])  # a part alone is normalised by its own maxima
