"""The kNN baseline (docs/method.md §6) against brute force: the Euclidean nearest reference of every
prefix of k shots from the shared tiled matcher, the chunked maps, the accumulator of a class."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from models.knn_baseline import KnnAccumulator, knn_anomaly_maps, nearest_distances_by_shots
from models.matching import Matcher, ReferenceBank

# Tiles of 5 columns (at most 2 rows of 5 per block): tiles straddle the shots' boundaries.
SMALL_TILES = Matcher(tiles={"cpu": (10, 5), "cuda": (10, 5)})


def _brute_nearest(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """First index of the smallest exact (float64) squared distance, one query at a time."""
    return torch.stack([((bank.double() - q.double()) ** 2).sum(dim=1).argmin() for q in queries])


@pytest.mark.parametrize("matcher", [SMALL_TILES, Matcher()], ids=["small tiles", "default"])
def test_euclidean_nearest_by_shots_is_the_first_nearest_row_with_many_exact_ties(matcher):
    gen = torch.Generator().manual_seed(0)
    # Small integers: every product and squared distance is exact in float32, and distinct rows are
    # often at exactly the same distance from a query, so the tie rule (first row) is really tested.
    bank = torch.randint(-2, 3, (4 * 9, 3), generator=gen).float()
    queries = torch.cat([torch.randint(-3, 4, (60, 3), generator=gen).float(), bank[[0, 20, 35]]])
    found = matcher.nearest_euclidean_by_shots(queries, bank, num_shots=4, shots=[3, 1, 4, 2])
    assert sorted(found) == [1, 2, 3, 4]
    ties = 0
    for k, index in found.items():
        prefix = bank[: 9 * k]
        squared = ((prefix.double()[None] - queries.double()[:, None]) ** 2).sum(dim=2)
        ties += int(((squared == squared.min(dim=1, keepdim=True).values).sum(dim=1) > 1).sum())
        assert torch.equal(index, _brute_nearest(queries, prefix)), k
    assert ties > 50


def test_euclidean_nearest_by_shots_matches_cdist_on_real_valued_rows():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(3 * 40, 24, generator=gen) * 3 + 5  # far from the origin: large |b|^2
    queries = torch.cat([torch.randn(200, 24, generator=gen) * 3 + 5, bank[:10] + 1e-3])
    for matcher in (SMALL_TILES, Matcher()):
        distances = nearest_distances_by_shots(queries, bank, 3, [1, 2, 3], matcher)
        for k, got in distances.items():
            exact = torch.cdist(queries.double(), bank[: 40 * k].double())
            assert torch.allclose(got.double(), exact.min(dim=1).values, rtol=1e-5, atol=1e-6), k
            assert torch.equal(matcher.nearest_euclidean_by_shots(queries, bank, 3, [k])[k], exact.argmin(dim=1))
    # the distance is recomputed directly: a 1e-3 offset is not lost to cancellation
    close = nearest_distances_by_shots(bank[:10] + 1e-3, bank, 3, [1])[1]
    assert torch.allclose(close, torch.full((10,), 1e-3 * 24 ** 0.5), rtol=1e-3)


def test_euclidean_nearest_by_shots_rejects_shots_beyond_the_bank():
    with pytest.raises(ValueError, match="must lie in 1..2"):
        Matcher().nearest_euclidean_by_shots(torch.zeros(3, 4), torch.zeros(8, 4), 2, [1, 3])


def _one_piece(levels, size, sigma):
    """Up-sampled, summed and smoothed in one piece (scipy's filter, float64): the direct formula."""
    up = sum(F.interpolate(m[:, None].float(), size=(size, size), mode="bilinear", align_corners=True)[:, 0]
             for m in levels)
    return np.stack([ndimage.gaussian_filter(u.numpy().astype(np.float64), sigma, mode="reflect") for u in up])


def test_knn_maps_in_chunks_equal_the_maps_in_one_piece():
    gen = torch.Generator().manual_seed(2)
    levels = [torch.rand(11, 8, 8, generator=gen) * 5, torch.rand(11, 4, 4, generator=gen) * 3]
    whole = knn_anomaly_maps(levels, size=24, sigma=1.5, chunk=11)
    for chunk in (1, 3, 4):
        assert torch.allclose(knn_anomaly_maps(levels, size=24, sigma=1.5, chunk=chunk), whole, rtol=0, atol=1e-6)
    assert np.allclose(whole.numpy(), _one_piece(levels, 24, 1.5), rtol=0, atol=1e-5)


def test_accumulator_gives_every_k_the_direct_formula_of_its_first_k_shots():
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 6, 6), (16, 3, 3)]
    refs = [torch.randn(3, *shape, generator=gen) for shape in shapes]
    bank = ReferenceBank.from_features(refs)
    batches = [[torch.randn(b, *shape, generator=gen) for shape in shapes] for b in (2, 3)]
    knn = KnnAccumulator([1, 3], SMALL_TILES)
    for features in batches:
        knn.add(features, bank)
    for k in (1, 3):
        expected_levels = []
        for level, ref in enumerate(refs):
            rows = ref[:k].permute(0, 2, 3, 1).reshape(-1, ref.shape[1]).double()
            feature = torch.cat([batch[level] for batch in batches]).double()
            n, c, h, w = feature.shape
            flat = feature.permute(0, 2, 3, 1).reshape(-1, c)
            expected_levels.append(torch.cdist(flat, rows).min(dim=1).values.view(n, h, w))
        got = knn.maps(k, size=20, sigma=1.0).numpy()
        assert got.shape == (5, 20, 20)
        assert np.allclose(got, _one_piece(expected_levels, 20, 1.0), rtol=0, atol=1e-4), k
    assert not np.allclose(knn.maps(1, 20, 1.0).numpy(), knn.maps(3, 20, 1.0).numpy(), atol=1e-3)
