"""What a dataset is: a list of :class:`Sample` records, and a torch Dataset over them.

The layout modules (``mvtec.py``, ``visa.py``, ...) only *list* samples; all
reading and pre-processing happens here, identically for every dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .image_io import read_image, read_mask
from .resize import DEFAULT_RESIZE, geometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMAL, ANOMALOUS = 0, 1
"""Values of :attr:`Sample.label`."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: path of the image file.
        label: ``NORMAL`` (0) or ``ANOMALOUS`` (1).
        masks: files whose pixel-wise union is the ground-truth mask (several
            for MVTec LOCO); empty for normal images.
        class_name: the object or texture class, e.g. ``"bottle"``.
    """

    image: str
    label: int
    masks: tuple[str, ...]
    class_name: str


def has_pixel_labels(samples: Sequence[Sample]) -> bool:
    """False when ``samples`` hold anomalous images and none of them has a mask: the images are
    labelled, not their pixels, so only image metrics can be computed (docs/method.md §5.5)."""
    anomalous = [s for s in samples if s.label]
    return not anomalous or any(s.masks for s in anomalous)


class AnomalyDataset(Dataset):
    """Images, ground-truth masks and labels of a list of samples.

    Pre-processing (:mod:`datasets.resize`): with ``resize="crop"`` the short side
    is resized to ``image_size`` (bicubic for images, nearest for masks), then
    both are center-cropped to ``image_size`` x ``image_size``; with
    ``resize="full"`` both are resized whole to that square.  Images are
    normalized with ``mean`` and ``std``, masks binarized to {0, 1}.

    Each item is a dict with ``image`` (float32, 3xSxS), ``mask`` (float32,
    1xSxS), ``label`` (int), ``class_name`` (str) and ``path`` (str).
    """

    def __init__(self, samples: Sequence[Sample], image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 resize: str = DEFAULT_RESIZE):
        self.samples = list(samples)
        self.image_size = image_size
        self.resize = resize
        self.image_transform = transforms.Compose([
            *geometry(image_size, resize, InterpolationMode.BICUBIC).transforms,
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
        self.mask_transform = geometry(image_size, resize, InterpolationMode.NEAREST)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image)
        return {
            "image": self.image_transform(image),
            "mask": self._mask_tensor(sample, image.size),
            "label": sample.label,
            "class_name": sample.class_name,
            "path": sample.image,
        }

    def _mask_tensor(self, sample: Sample, image_size: tuple[int, int]) -> torch.Tensor:
        """The sample's ground truth, pre-processed like its image, as a 1xSxS {0,1} tensor."""
        if not sample.masks:
            return torch.zeros(1, self.image_size, self.image_size)
        mask = Image.fromarray(read_mask(sample.masks, image_size).astype(np.uint8) * 255)
        mask = np.asarray(self.mask_transform(mask)) > 0
        return torch.from_numpy(mask.astype(np.float32)).unsqueeze(0)
