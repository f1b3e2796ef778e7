"""The fast paths compute what the plain ones compute: certified matching, the reference
pool's feature reuse, a training epoch against the previous implementation; and the
first-run checks that run before any backbone is built."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models.matching as matching
from datasets import Sample
from models.matching import Matcher, certified_argmax_rows, nearest_reference_indices, similarity_error_bound
from models.extractor import BackboneConfig
from models.resad import ModelConfig
from models.residual import _sorted_values
from models.resad import ResAD
from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _brute_force_argmax(queries: torch.Tensor, bank: torch.Tensor) -> np.ndarray:
    """Arg-max of the exact (float64) dot products of the given float32 unit rows, one query at a time."""
    q, b = queries.double().numpy(), bank.double().numpy()
    return np.array([int(np.argmax(b @ row)) for row in q])


def _near_tied(dim: int, distinct: int = 40, copies: int = 5, queries: int = 200):
    """A bank of clusters of almost identical rows (1e-6 apart: no 16-bit dtype can order them)."""
    base = F.normalize(torch.randn(distinct, dim), dim=1)
    bank = base.repeat(copies, 1) + 1e-6 * torch.randn(distinct * copies, dim)
    picks = torch.randint(0, distinct, (queries,))
    q = base[picks] + 1e-5 * torch.randn(queries, dim)
    return q, bank


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [24, 112])
def test_certified_matcher_equals_brute_force_on_near_ties(dtype, dim):
    q, bank = _near_tied(dim)
    q, bank = F.normalize(q, dim=1), F.normalize(bank, dim=1)
    expected = _brute_force_argmax(q, bank)
    approx = torch.mm(q.to(dtype), bank.t().to(dtype)).float().argmax(1)
    assert (approx.numpy() != expected).mean() > 0.3  # the 16-bit products alone get these wrong
    got = certified_argmax_rows(q, bank, dtype)
    assert (got.numpy() == expected).all()


def test_the_certified_product_accumulates_in_float32_whatever_the_global_setting(monkeypatch):
    """CUDA may reduce half-precision products in reduced precision (PyTorch's default), which the bound does
    not cover: the matcher's product runs with that off, and the user's setting is restored after."""
    import models.matching as matching

    seen = []
    real_mm = torch.mm

    def recording_mm(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                     torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction))
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", True)
    monkeypatch.setattr(matching.torch, "mm", recording_mm)
    q, bank = _near_tied(24, queries=20)
    certified_argmax_rows(F.normalize(q, dim=1), F.normalize(bank, dim=1), torch.float16)
    assert seen == [(False, False)]
    assert torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction is True
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [24, 256])
def test_similarity_error_bound_holds(dtype, dim):
    # rows with a few large and many tiny entries (subnormal in float16) and plain random rows
    spiky = torch.randn(300, dim) * torch.where(torch.rand(300, dim) < 0.1, 1.0, 1e-6)
    rows = F.normalize(torch.cat([spiky, torch.randn(300, dim), torch.rand(300, dim)]), dim=1)
    exact = rows.double() @ rows.double().t()
    approx = torch.mm(rows.to(dtype), rows.t().to(dtype)).double()
    assert (approx - exact).abs().max().item() <= similarity_error_bound(dtype, dim)


def test_nearest_reference_indices_certified_path():
    q, bank = _near_tied(40, queries=257)
    expected = _brute_force_argmax(F.normalize(q, dim=1), F.normalize(bank, dim=1))
    certified = Matcher(approximate={"cpu": torch.float16}, blocks={"cpu": 200 * 30})  # blocks of 30 query rows
    assert (certified.nearest(q, F.normalize(bank, dim=1)).numpy() == expected).all()


# --------------------------------------------------------------------------- reference pool reuse

class TinyExtractor:
    """A deterministic stand-in for a frozen backbone: 3 levels of average-pooled pixels."""

    channels = [4, 4, 4]
    image_size = 32
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    resize = "crop"

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += images.shape[0]
        x = torch.cat([images, images[:, :1] * images[:, 1:2]], dim=1)
        return [F.avg_pool2d(x, k) for k in (4, 8, 16)]


@pytest.fixture
def tiny_images(tmp_path):
    rng = np.random.default_rng(0)
    normals = {}
    for name in ("a", "b"):
        normals[name] = []
        for i in range(3):
            path = tmp_path / f"{name}{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
            normals[name].append(Sample(str(path), 0, (), name))
    return normals


def test_pool_encodes_only_new_images_and_serves_batches(tiny_images):
    from utils.run.loaders import make_loader
    from utils.run.reference_pool import TrainReferencePool

    extractor = TinyExtractor()
    pool = TrainReferencePool(extractor, tiny_images, pool_size=2, batch_size=4, num_workers=0,
                              device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    for refresh in range(4):
        before = pool._where.copy()
        seen = extractor.images_seen
        pool.refresh(generator)
        new = [p for p in pool._where if p not in before]
        assert extractor.images_seen - seen == len(new)
        for name, levels in pool.features.items():  # the pool holds exactly the chosen images' features
            paths = [p for p, (owner, _) in sorted(pool._where.items(), key=lambda kv: kv[1][1]) if owner == name]
            batch = next(iter(make_loader([Sample(p, 0, (), name) for p in paths], extractor, 8, 0)))
            for level, direct in zip(levels, TinyExtractor()(batch["image"])):
                assert torch.allclose(level, direct, atol=1e-6)
    inside = list(pool._where)[:3]
    batch = next(iter(make_loader([Sample(p, 0, (), "x") for p in inside], extractor, 8, 0)))
    normal = torch.zeros(len(inside), dtype=torch.long)
    for got, direct in zip(pool.lookup(inside, normal), TinyExtractor()(batch["image"])):
        assert torch.allclose(got, direct, atol=1e-6)
    outside = next(s.image for group in tiny_images.values() for s in group if s.image not in pool._where)
    assert pool.lookup(inside + [outside], torch.zeros(len(inside) + 1)) is None
    assert pool.lookup(inside, torch.tensor([0, 1, 0])) is None  # an anomalous item: never the pool's features


def test_references_without_self_never_hold_the_image_and_share_one_draw(tiny_images):
    """--train_exclude_self: every image of a class gets `shots` references of its class, none of them
    itself; the images the draw did not pick share the very bank that --train_exclude_self off draws."""
    from models.positions import flatten_positions
    from utils.run.reference_pool import TrainReferencePool

    pool = TrainReferencePool(TinyExtractor(), tiny_images, pool_size=3, batch_size=4, num_workers=0,
                              device=torch.device("cpu"))
    pool.refresh(torch.Generator().manual_seed(0))

    def images(bank):  # one row per reference image (coarsest level, image-major rows)
        return [tuple(r.tolist()) for r in bank.levels[-1].reshape(bank.num_shots, -1)]

    for name, group in tiny_images.items():
        paths = [s.image for s in group]
        own = [tuple(flatten_positions(f[None]).reshape(-1).tolist()) for f in pool.lookup(paths, torch.zeros(3))[-1]]
        assert len(set(own)) == 3
        for seed in range(6):
            banks = pool.banks(name, paths, 2, torch.Generator().manual_seed(seed), exclude_self=True)
            [(shared, plain)] = pool.banks(name, paths, 2, torch.Generator().manual_seed(seed))
            assert shared.tolist() == [0, 1, 2]  # without exclusion one bank serves every image
            plain = images(plain)
            assert sorted(i for rows, _ in banks for i in rows.tolist()) == [0, 1, 2]
            for rows, bank in banks:
                refs = images(bank)
                assert len(set(refs)) == 2 and set(refs) <= set(own)
                for i in rows.tolist():
                    assert own[i] not in refs  # never the image itself
                    if own[i] not in plain:
                        assert refs == plain
                    else:  # the draw's next image takes the image's own place
                        assert [r for r in refs if r in plain] == [r for r in plain if r != own[i]]


def test_synthetic_anomalies_on_pool_images_are_encoded_not_looked_up(tiny_images):
    """Stage 2 with synthetic anomalies drawn on the very images of the pool: the model must see the
    defective images' features (a synthetic item keeps its normal image's path)."""
    from datasets.anomaly_source import SyntheticAnomalyDataset
    from tests.run_helpers import make_args
    from utils.cli.adapters import run_config
    from utils.run.loaders import make_loader
    from utils.run.reference_pool import TrainReferencePool
    from utils.run.training import Trainer, train_one_epoch

    samples = [s for group in tiny_images.values() for s in group]
    extractor = TinyExtractor()
    pool = TrainReferencePool(extractor, tiny_images, 3, 4, 0, torch.device("cpu"))  # every image is in it
    pool.refresh(torch.Generator().manual_seed(0))
    synthetic = lambda *a, **k: SyntheticAnomalyDataset(*a, fraction=1.0, seed=0, **k)  # noqa: E731
    loader = make_loader(samples, extractor, 3, 0, dataset_class=synthetic)
    model = ResAD(TinyExtractor.channels, ModelConfig(num_embeddings=16, coupling_layers=2, pos_embed_dim=16))
    trainer = Trainer(model, run_config(make_args(train_ref_shot=2, batch_size=3), [4], {4: "run"}).training)
    seen = []
    trainer.train_step = lambda features, *rest: seen.append([f.clone() for f in features]) or {}
    train_one_epoch(trainer, extractor, loader, pool, True, torch.Generator().manual_seed(0),
                    torch.device("cpu"), desc="test")
    batches = list(loader)
    assert len(seen) == len(batches) == 2 and all(int(b["label"].sum()) == 3 for b in batches)
    for used, batch in zip(seen, batches):
        direct = TinyExtractor()(batch["image"])
        clean = pool.lookup(batch["path"], torch.zeros(3))
        assert all(torch.allclose(u, d, atol=1e-6) for u, d in zip(used, direct))
        assert not torch.allclose(used[0], clean[0], atol=1e-3)  # the defects are in what the model saw


def test_training_epoch_gives_the_losses_of_the_previous_implementation(tiny_images):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import legacy
    from tests.run_helpers import make_args
    from utils.cli.adapters import run_config
    from utils.run.loaders import make_loader
    from utils.run.reference_pool import TrainReferencePool
    from utils.run.training import Trainer, train_one_epoch

    samples = [s for group in tiny_images.values() for s in group]
    args = make_args(lr=1e-3, train_ref_shot=2, batch_size=4, num_embeddings=16, coupling_layers=2,
                     pos_embed_dim=16)

    def run(old: bool):
        torch.manual_seed(0)
        np.random.seed(0)
        model = ResAD(TinyExtractor.channels, ModelConfig(num_embeddings=16, coupling_layers=2, pos_embed_dim=16))
        model = legacy.legacy_copy(model) if old else model
        trainer = Trainer(model, run_config(args, [4], {4: "run"}).training)
        generator = torch.Generator().manual_seed(0)
        pool = (legacy.LegacyReferencePool if old else TrainReferencePool)(
            TinyExtractor(), tiny_images, 2, 4, 0, torch.device("cpu"))
        loader = make_loader(samples, TinyExtractor(), 4, 0, shuffle=True, drop_last=True, generator=generator)
        losses = []
        for _ in range(2):
            pool.refresh(generator)
            losses.append(train_one_epoch(trainer, pool.extractor, loader, pool, False, generator,
                                          torch.device("cpu"), desc="test"))
        return losses, [p.detach().clone() for p in model.parameters()]

    new_losses, new_params = run(False)
    old_losses, old_params = run(True)
    for new, old in zip(new_losses, old_losses):
        for key in ("vq", "occ", "flow"):
            assert math.isfinite(old[key])
            assert new[key] == pytest.approx(old[key], rel=1e-5)
    for a, b in zip(new_params, old_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- first-run checks

def _no_backbone(*args, **kwargs):
    raise AssertionError("the backbone was built before the paths were checked")


def test_extract_ref_features_checks_paths_before_the_backbone(tmp_path, monkeypatch):
    import extract_ref_features

    monkeypatch.setattr(BackboneConfig, "build", _no_backbone)
    with pytest.raises(UserError, match="few-shot folder"):
        extract_ref_features.main(["--dataset", "mvtec", "--few_shot_dir", str(tmp_path / "typo"),
                                   "--save_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match="--few_shot_dir is empty"):
        extract_ref_features.main(["--dataset", "mvtec", "--few_shot_dir", ""])


def test_fit_checks_reference_features_before_the_backbone(tmp_path, monkeypatch):
    from datasets import generate_demo_dataset
    from tests.run_helpers import fit, make_args

    root = generate_demo_dataset(str(tmp_path / "demo"), n_train=2, n_test_good=1, n_test_anomalous=1)
    monkeypatch.setattr(BackboneConfig, "build", _no_backbone)
    args = make_args(setting="demo", train_dataset_dir=root, test_dataset_dir=root, batch_size=2,
                     train_ref_shot=1, test_ref_feature_dir=str(tmp_path / "typo"),
                     checkpoint_path=str(tmp_path / "ckpt"))
    with pytest.raises(UserError, match="--test_ref_feature_dir .*folder not found"):
        fit(args, [1], {1: "demo"})


def test_empty_dataset_flag_is_named():
    from datasets import evaluation_samples

    with pytest.raises(UserError, match="^--test_dataset_dir is empty"):
        evaluation_samples("mvtec", "", "bottle")


def test_download_without_result_fails(tmp_path, monkeypatch):
    import huggingface_hub

    sys.path.insert(0, os.path.join(REPO, "data"))
    import download_fewshot
    from utils.errors import run_cli

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(tmp_path))
    assert run_cli(download_fewshot.main, ["--out", str(tmp_path)]) == 2


# --------------------------------------------------------------------------- evaluation fast paths

def test_evaluation_scores_equal_the_previous_implementation():
    """Tiled matching, the reused VQ buffer, numpy's value sort in EFDM and the cached flow position
    tables give bit-identical per-level maps to the implementation before them, for several k."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import legacy
    # many row blocks and column tiles, several flow chunks per image
    model = ResAD([6, 10], ModelConfig(num_embeddings=32, coupling_layers=2, pos_embed_dim=16),
                  matcher=Matcher(tiles={"cpu": (50 * 40, 40)}), inference_chunk={"cpu": 100}).eval()
    # ReLU-like features: many exact zeros, so residuals and EFDM sorts have ties
    features = [torch.randn(3, 6, 12, 12).relu(), torch.randn(3, 10, 6, 6).relu()]
    bank = matching.ReferenceBank.from_features([torch.randn(4, 6, 12, 12).relu(), torch.randn(4, 10, 6, 6).relu()])
    with torch.inference_mode():
        new = model.forward_shots(features, bank, [1, 3, 4])
        old = legacy.legacy_copy(model).forward_shots(features, bank, [1, 3, 4])
    for k in (1, 3, 4):
        for a, b in zip(new[k][0] + new[k][1], old[k][0] + old[k][1]):
            assert torch.equal(a, b)


def test_cached_position_table_follows_weight_updates():
    from models.flow import LevelFlow, grid_coordinates

    flow = LevelFlow(6, coupling_layers=2, pos_embed_dim=16).eval()
    rows, coords = torch.randn(50, 6), grid_coordinates(5, 10)
    with torch.no_grad():
        before = flow(rows, coords)[0]
        assert torch.equal(flow(rows, coords)[0], before)  # served from the cache
        for module in flow.modules():
            if hasattr(module, "fc1"):
                module.fc1.weight.mul_(1.5)                  # an in-place update, as an optimizer step
    with torch.enable_grad():
        reference = flow(rows, coords)[0].detach()           # built without the cache
    with torch.no_grad():
        after = flow(rows, coords)[0]
    assert not torch.allclose(after, before)
    assert torch.equal(after, reference)
    state = {k: v * 0.5 if k.endswith("fc1.bias") else v for k, v in flow.state_dict().items()}
    flow.load_state_dict(state)
    with torch.enable_grad():
        reference = flow(rows, coords)[0].detach()
    with torch.inference_mode():
        assert torch.equal(flow(rows, coords)[0], reference)


def test_numpy_value_sort_equals_torch_sort_with_ties():
    values = torch.randint(-3, 4, (5, 7, 300)).float() * 0.5
    values[0, 0, :10] = -0.0
    assert torch.equal(_sorted_values(values), values.sort(dim=-1).values)


def test_the_previous_pool_refuses_train_exclude_self(tiny_images):
    """benchmarks/legacy.py's pool cannot exclude an image from its own references: it refuses, and so does
    train_speed.py --compare --train_exclude_self (before any work)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import legacy
    import train_speed

    from utils.errors import UserError

    pool = legacy.LegacyReferencePool(TinyExtractor(), tiny_images, 2, 4, 0, torch.device("cpu"))
    pool.refresh(torch.Generator().manual_seed(0))
    name = next(iter(tiny_images))
    paths = [s.image for s in tiny_images[name]][:2]
    assert pool.banks(name, paths, 1, torch.Generator().manual_seed(1))   # without it: as before
    with pytest.raises(ValueError, match="train_exclude_self"):
        pool.banks(name, paths, 1, torch.Generator().manual_seed(1), exclude_self=True)
    with pytest.raises(UserError, match="--compare --train_exclude_self"):
        train_speed.main(["--compare", "--train_exclude_self"])
