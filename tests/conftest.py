"""Fixtures shared by several test modules (trained once per session)."""
import os
from types import SimpleNamespace

import pytest

from datasets import DEMO_SEEN, generate_demo_dataset
from models.extractor import OFFLINE_BACKBONE, build_extractor
from tests.run_helpers import fit, make_args
from utils.run.extraction import extract_reference_features

CLASS = "chip"      # an unseen demo class: 2 normal and 3 anomalous test images, 6 normal training images
OTHER = "weave"     # a second unseen class with its references


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A demo checkpoint trained for one epoch on two seen classes (two coupling layers, 64 codebook entries),
    and 4-shot reference features of two unseen classes."""
    base = tmp_path_factory.mktemp("trained")
    root = generate_demo_dataset(str(base / "demo"), n_train=6, n_test_good=2, n_test_anomalous=3)
    extractor = build_extractor(OFFLINE_BACKBONE)
    refs = str(base / "refs")
    extract_reference_features("demo", root, refs, extractor, shots=4, classes=[CLASS, OTHER])
    args = make_args(setting="custom", source_dataset="demo", target_dataset="demo", seen_classes=list(DEMO_SEEN[:2]),
                     unseen_classes=[CLASS], train_dataset_dir=root, test_dataset_dir=root, test_ref_feature_dir=refs,
                     num_ref_shot=4, train_ref_shot=2, train_ref_pool=3, backbone=OFFLINE_BACKBONE, epochs=1,
                     stage1_epochs=1, batch_size=8, eval_batch_size=8, lr=1e-4, num_workers=0,
                     checkpoint_path=str(base / "ckpt"), coupling_layers=2, num_embeddings=64, num_heatmaps=0,
                     device="cpu", no_aupro=True)
    fit(args, shots=[4], run_names={4: "demo"}, extractor=extractor)
    return SimpleNamespace(root=root, refs=refs, extractor=extractor, base=base,
                           ckpt=str(base / "ckpt" / "demo" / "demo_latest.pth"),
                           images=os.path.join(root, CLASS, "test"),
                           ref_images=os.path.join(root, CLASS, "train", "good"))
