"""ImageBind-Huge's vision trunk as a timm ViT-H/14: the checkpoint's key mapping, nothing vendored.

ImageBind's vision encoder is a pre-norm ViT-H/14 (1280 wide, 32 blocks, 16
heads, LayerNorm eps 1e-6) that timm's ``vit_huge_patch14_clip_224`` holds
exactly.  Its checkpoint differs only in names, and in the stem: a Conv3d of
kernel (2, 14, 14) over a clip of two identical frames, which equals a Conv2d
whose kernel is the sum of the two temporal slices.  Only the vision keys are
used; the other modalities are ignored (listed in a debug log).

The weights are published at :data:`IMAGEBIND_URL`; they are never downloaded
at run time.
"""
from __future__ import annotations

import logging
import os
import re
from functools import partial
from typing import Dict, Optional

import torch
import torch.nn as nn

from utils.errors import UserError

IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
IMAGEBIND_WEIGHTS = "./pretrained_weights/imagebind/imagebind_huge.pth"
TIMM_ARCH = "vit_huge_patch14_clip_224"
BLOCKS = (7, 15, 23, 31)  # the authors' levels: outputs of every eighth block, no final norm
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PRE = "modality_preprocessors.vision."
_TRUNK = "modality_trunks.vision."
_HEAD = "modality_heads.vision."
_STEM = _PRE + "rgbt_stem.proj.1.weight"
# ImageBind name -> timm name, inside "blocks.N."
_BLOCK_RENAMES = {"norm_1.": "norm1.", "norm_2.": "norm2.", "attn.in_proj_weight": "attn.qkv.weight",
                  "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj.": "attn.proj.", "mlp.": "mlp."}
_SINGLE_RENAMES = {_PRE + "cls_token": "cls_token", _PRE + "pos_embedding_helper.pos_embed": "pos_embed",
                   _TRUNK + "pre_transformer_layer.0.weight": "norm_pre.weight",
                   _TRUNK + "pre_transformer_layer.0.bias": "norm_pre.bias",
                   _HEAD + "0.weight": "norm.weight", _HEAD + "0.bias": "norm.bias",
                   _HEAD + "2.weight": "head.weight"}

log = logging.getLogger(__name__)


def _not_found(path: str, flag: str) -> UserError:
    return UserError(f"{flag} {path}: ImageBind-Huge weights not found; download {IMAGEBIND_URL} to "
                     f"{os.path.abspath(path)} (or pass its location with --backbone_weights FILE)")


def read_checkpoint(path: str, flag: str = "--backbone_weights") -> Dict[str, torch.Tensor]:
    """The state_dict of an ImageBind checkpoint file (tensors only: ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise _not_found(path, flag)
    state = None
    for mmap in (True, False):  # mmap keeps the 4.5 GB file out of memory; older formats cannot be mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:  # unpickling errors come in many types
            continue
    if not isinstance(state, dict) or _STEM not in state:
        raise UserError(f"{flag} {path}: not the ImageBind-Huge checkpoint (no {_STEM}); "
                        f"download {IMAGEBIND_URL}")
    return state


def imagebind_to_timm(checkpoint: Dict[str, torch.Tensor], model: nn.Module, path: str = "the checkpoint",
                      flag: str = "--backbone_weights") -> Dict[str, torch.Tensor]:
    """Rename ImageBind's vision keys to those of a timm ViT ``model``; every trunk tensor must be present
    with the model's shape (the head bias, which ImageBind does not have, is zero)."""
    mapped: Dict[str, torch.Tensor] = {}
    ignored = []
    block_key = re.compile(re.escape(_TRUNK) + r"blocks\.(\d+)\.(.+)")
    for key, tensor in checkpoint.items():
        if key in _SINGLE_RENAMES:
            mapped[_SINGLE_RENAMES[key]] = tensor
        elif key == _STEM:
            mapped["patch_embed.proj.weight"] = tensor.sum(dim=2) if tensor.ndim == 5 else tensor
        elif (match := block_key.fullmatch(key)) is not None:
            number, rest = match.groups()
            for old, new in _BLOCK_RENAMES.items():
                if rest.startswith(old):
                    mapped[f"blocks.{number}.{new}{rest[len(old):]}"] = tensor
                    break
            else:
                ignored.append(key)
        else:
            ignored.append(key)
    if "head.weight" in mapped:
        mapped["head.bias"] = torch.zeros(mapped["head.weight"].shape[0], dtype=mapped["head.weight"].dtype)
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    if missing:
        raise UserError(f"{flag} {path}: not an ImageBind-Huge checkpoint: it lacks the tensor for {missing[0]} "
                        f"({len(missing)} missing); download {IMAGEBIND_URL}")
    for key, ref in expected.items():
        if mapped[key].shape != ref.shape:
            raise UserError(f"{flag} {path}: {key} has shape {tuple(mapped[key].shape)}, the ViT expects "
                            f"{tuple(ref.shape)}; download {IMAGEBIND_URL}")
    extra = [k for k in mapped if k not in expected]
    if extra:
        raise UserError(f"{flag} {path}: the checkpoint has tensors the ViT lacks ({extra[0]}); "
                        f"it is not ImageBind-Huge: download {IMAGEBIND_URL}")
    log.debug("ImageBind checkpoint: %d keys ignored (other modalities): %s", len(ignored), ", ".join(ignored))
    return mapped


def load_imagebind_weights(model: nn.Module, path: str, checkpoint: Optional[Dict[str, torch.Tensor]] = None,
                           assign: bool = False) -> nn.Module:
    """Fill every parameter of the timm ViT ``model`` from the ImageBind checkpoint at ``path`` (strict).

    ``assign=True`` takes the checkpoint's tensors as the parameters (for a model
    built on the meta device: no random initialisation, no second copy)."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    mapped = {k: v.to(torch.float32) for k, v in imagebind_to_timm(checkpoint, model, path).items()}
    model.load_state_dict(mapped, strict=True, assign=assign)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"ImageBind mapping left {left[0]} uninitialised")
    return model


def imagebind_vit(**kwargs) -> nn.Module:
    """timm's ViT-H/14 shaped like ImageBind's vision trunk (random weights)."""
    import timm

    return timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1024,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def build_imagebind_vit(weights: Optional[str] = None) -> nn.Module:
    """ImageBind-Huge's vision trunk with its weights.

    The file is read (memory-mapped) before anything is built; the ViT is built
    on the meta device and takes the checkpoint's tensors, so its 631 M
    parameters are neither randomly initialised nor held twice.
    """
    path = weights or IMAGEBIND_WEIGHTS
    checkpoint = read_checkpoint(path)
    with torch.device("meta"):
        model = imagebind_vit()
    return load_imagebind_weights(model, path, checkpoint, assign=True)
