"""Reference features of the unseen classes: encode the few-shot images once and save them
(the files: :mod:`utils.formats.reference_features`)."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch
from tqdm import tqdm

from datasets import Sample
from models.extractor import FeatureExtractor
from utils.atomic import ensure_dir
from utils.errors import UserError
from utils.formats import reference_features
from utils.run.loaders import make_loader


def reference_files(dataset: str, few_shot_dir: str, shots: Optional[int] = None,
                    classes: Optional[Sequence[str]] = None, batch_size: int = 8) -> Dict[str, list]:
    """Check the arguments of :func:`extract_reference_features` and list the images per class
    (cheap: scripts call it before building the backbone, so a typo costs no download)."""
    from datasets import dataset_classes, list_fewshot_images

    if (shots is not None and shots < 1) or batch_size < 1:
        raise ValueError(f"shots ({shots}) and batch_size ({batch_size}) must be at least 1")
    if not few_shot_dir:
        raise UserError("--few_shot_dir is empty: give the folder of <class>/train/good reference images")
    available = dataset_classes(dataset, few_shot_dir, "--few_shot_dir")
    names = list(classes) if classes else list(available)
    unknown = [c for c in names if c not in available]
    if unknown:
        raise UserError(f"--classes: {', '.join(unknown)} not in {dataset} (classes: {', '.join(available)})")
    return {c: list_fewshot_images(few_shot_dir, c, max_shots=shots) for c in names}


@torch.inference_mode()
def extract_reference_features(dataset: str, few_shot_dir: str, save_dir: str, extractor: FeatureExtractor,
                               shots: Optional[int] = None, classes: Optional[Sequence[str]] = None,
                               batch_size: int = 8, num_workers: int = 0) -> Dict[str, str]:
    """Encode the few-shot reference images of every class of ``dataset`` and save them.

    Writes ``<save_dir>/<class>/layer{1..L}.npy`` (one per feature level) (float32, (k*H*W, C),
    image-major) plus ``meta.json`` naming the backbone and the image files.
    """
    files = reference_files(dataset, few_shot_dir, shots, classes, batch_size)  # check all first
    names = list(files)
    ensure_dir(save_dir, "--save_dir")
    written = {}
    device = next(extractor.parameters()).device
    for class_name in tqdm(names, desc=f"reference features ({dataset})", dynamic_ncols=True):
        samples = [Sample(path, 0, (), class_name) for path in files[class_name]]
        levels = [[] for _ in extractor.channels]
        for batch in make_loader(samples, extractor, batch_size, num_workers):
            for level, f in enumerate(extractor(batch["image"].to(device))):
                levels[level].append(f.cpu())
        meta = dict(extractor.describe(), dataset=dataset, images=[os.path.abspath(p) for p in files[class_name]])
        written[class_name] = reference_features.save(save_dir, class_name, [torch.cat(l) for l in levels], meta)
    return written
