"""The offline demo: generate the synthetic dataset and its reference features (docs/method.md §1)."""
from __future__ import annotations

import os

from datasets import DEMO_UNSEEN, generate_demo_dataset
from datasets.demo import DEFAULT_TRAIN_IMAGES
from models.extractor import FeatureExtractor
from utils import distributed
from utils.atomic import check_writable
from utils.errors import UserError
from utils.run.config import RunConfig
from utils.run.extraction import extract_reference_features
from utils.runtime import resolve_device


def prepare_demo(config: RunConfig) -> FeatureExtractor:
    """Generate the synthetic dataset at ``config.data.test_dataset_dir`` (reused when present) and the
    reference features of its unseen classes; returns the extractor, for the run to reuse."""
    shots = max(config.shots)
    if shots > DEFAULT_TRAIN_IMAGES:
        raise UserError(f"{config.evaluation.shots_flag} {shots}: the demo classes have {DEFAULT_TRAIN_IMAGES} "
                        f"normal images each, so at most {DEFAULT_TRAIN_IMAGES} reference shots")
    check_writable(config.checkpoint_path)
    check_writable(config.data.test_ref_feature_dir, "--test_ref_feature_dir")
    ranks = distributed.init(config.device)
    extractor = config.backbone.build(resolve_device(distributed.device_of(ranks, config.device)))
    if ranks.primary:   # under torchrun rank 0 writes the dataset and the features, the others wait for them
        root = generate_demo_dataset(config.data.test_dataset_dir)
        print(f"demo dataset: {os.path.abspath(root)}")
        extract_reference_features("demo", root, config.data.test_ref_feature_dir, extractor, shots=shots,
                                   classes=DEMO_UNSEEN)
    distributed.barrier()
    return extractor
