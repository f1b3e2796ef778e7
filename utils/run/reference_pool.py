"""The training references: encoded features of a bounded pool of normal images per seen class
(docs/method.md §3.2)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets import Sample
from models.extractor import FeatureExtractor
from models.matching import ReferenceBank
from utils.run.loaders import make_loader
from utils.stages import stage


class TrainReferencePool:
    """Encoded features of a bounded pool of normal training images per seen class.

    The authors re-read and re-encode k random images per class in every batch;
    here ``pool_size`` images per class are drawn once per epoch (:meth:`refresh`)
    and each batch draws its k references from the pool.  The extractor is frozen,
    so an image's features never change: a refresh encodes only the images that
    were not in the previous pool, and a training batch whose images are all in
    the pool takes their features from it (:meth:`lookup`) instead of running the
    backbone again.  Memory stays that of one pool.
    """

    def __init__(self, extractor: FeatureExtractor, normals: Dict[str, List[Sample]], pool_size: int,
                 batch_size: int, num_workers: int, device: torch.device):
        self.extractor, self.normals, self.pool_size = extractor, normals, pool_size
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.features: Dict[str, List[torch.Tensor]] = {}
        self._where: Dict[str, tuple] = {}  # image path -> (class, row in that class's pool tensors)
        self.encoded_last_refresh = 0

    def refresh(self, generator: torch.Generator) -> None:
        """Draw this epoch's pool and encode the images that were not in the previous one."""
        with stage("reference pool refresh"):
            self._refresh(generator)

    def _refresh(self, generator: torch.Generator) -> None:
        chosen: Dict[str, List[Sample]] = {}
        for name, samples in self.normals.items():
            order = torch.randperm(len(samples), generator=generator)[: self.pool_size].tolist()
            chosen[name] = [samples[i] for i in sorted(order)]
        missing = list(dict.fromkeys(s.image for picks in chosen.values() for s in picks if s.image not in self._where))
        by_path = {s.image: s for picks in chosen.values() for s in picks}
        fresh: Dict[str, List[torch.Tensor]] = {}
        if missing:
            loader = make_loader([by_path[p] for p in missing], self.extractor, self.batch_size, self.num_workers)
            encoded = [[] for _ in self.extractor.channels]
            for batch in tqdm(loader, desc="reference pool", leave=False, dynamic_ncols=True):
                for level, f in enumerate(self.extractor(batch["image"].to(self.device))):
                    encoded[level].append(f)
            encoded = [torch.cat(level) for level in encoded]
            fresh = {path: [level[i] for level in encoded] for i, path in enumerate(missing)}

        def image_features(path: str) -> List[torch.Tensor]:
            if path in fresh:
                return fresh[path]
            name, row = self._where[path]
            return [level[row] for level in self.features[name]]

        features = {name: [torch.stack(level) for level in zip(*(image_features(s.image) for s in picks))]
                    for name, picks in chosen.items()}
        self.features = features
        self._where = {s.image: (name, row) for name, picks in chosen.items() for row, s in enumerate(picks)}
        self.encoded_last_refresh = len(missing)

    def lookup(self, paths: Sequence[str], labels: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """Per-level features of these images from the pool, or None unless all of them are in it.

        The pool holds the features of unmodified normal images, so a batch with an anomalous item
        is never served from it: a synthetic anomaly keeps the path of the normal image it was drawn
        on, and the pool's features of that path are those of the image without the defect.
        """
        if not self._where or bool(torch.as_tensor(labels).any()) or any(p not in self._where for p in paths):
            return None
        places = [self._where[p] for p in paths]
        return [torch.stack([self.features[name][level][row] for name, row in places])
                for level in range(len(self.extractor.channels))]

    def banks(self, class_name: str, paths: Sequence[str], shots: int, generator: torch.Generator,
              exclude_self: bool = False) -> List[Tuple[np.ndarray, ReferenceBank]]:
        """The references of a batch's images of one class: ``shots`` images of one random draw of the
        class's pool, shared by all of them; with ``exclude_self`` (``--train_exclude_self``) an image
        that the draw picked gets the draw's next image in its own place.  Returns (positions in
        ``paths``, bank) pairs, one per distinct bank."""
        levels = self.features[class_name]
        order = torch.randperm(levels[0].shape[0], generator=generator).tolist()
        groups: Dict[tuple, List[int]] = {}
        for i, path in enumerate(paths):
            owner, row = self._where.get(path, (None, -1))
            own = row if exclude_self and owner == class_name else -1
            picks = tuple(order[shots] if r == own else r for r in order[:shots])
            groups.setdefault(picks, []).append(i)
        banks = []
        for picks, rows in groups.items():
            index = torch.tensor(picks, device=self.device)
            banks.append((np.array(rows), ReferenceBank.from_features([level[index] for level in levels])))
        return banks

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for levels in self.features.values() for t in levels)
