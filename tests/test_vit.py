"""ViT backbones: ImageBind's key mapping against a direct computation, and any timm ViT end to end."""
import argparse
import json
import os
from functools import partial
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from datasets import DEMO_UNSEEN, generate_demo_dataset
from models.extractor import (OFFLINE_BACKBONE, ViTExtractor, build_extractor, evenly_spaced_blocks)
from models.imagebind import IMAGEBIND_URL, imagebind_to_timm, imagebind_vit, load_imagebind_weights
from tests.run_helpers import fit
from utils.formats import checkpoint
from utils.formats.reference_features import load_bank as load_reference_bank
from utils.errors import UserError
from utils.cli.options import Parser, add_training_arguments
from utils.run.extraction import extract_reference_features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, DEPTH, PATCH, SIZE, EMBED = 64, 4, 2, 14, 56, 16


def imagebind_checkpoint(width=WIDTH, depth=DEPTH, tokens=(SIZE // PATCH) ** 2 + 1, embed=EMBED, make=None):
    """Tensors named and shaped like imagebind_huge.pth (vision part, plus keys of other modalities)."""
    g = torch.Generator().manual_seed(0)
    make = make or (lambda *shape: torch.randn(*shape, generator=g) * 0.2)
    pre, trunk, head = "modality_preprocessors.vision.", "modality_trunks.vision.", "modality_heads.vision."
    ckpt = {pre + "rgbt_stem.proj.1.weight": make(width, 3, 2, PATCH, PATCH), pre + "cls_token": make(1, 1, width),
            pre + "pos_embedding_helper.pos_embed": make(1, tokens, width),
            trunk + "pre_transformer_layer.0.weight": 1 + make(width), trunk + "pre_transformer_layer.0.bias": make(width),
            head + "0.weight": 1 + make(width), head + "0.bias": make(width), head + "2.weight": make(embed, width),
            "modality_postprocessors.vision.1.log_logit_scale": make(1),
            "modality_trunks.text.blocks.0.attn.in_proj_weight": make(3 * width, width)}
    for n in range(depth):
        b = f"{trunk}blocks.{n}."
        ckpt.update({b + "norm_1.weight": 1 + make(width), b + "norm_1.bias": make(width),
                     b + "attn.in_proj_weight": make(3 * width, width), b + "attn.in_proj_bias": make(3 * width),
                     b + "attn.out_proj.weight": make(width, width), b + "attn.out_proj.bias": make(width),
                     b + "norm_2.weight": 1 + make(width), b + "norm_2.bias": make(width),
                     b + "mlp.fc1.weight": make(4 * width, width), b + "mlp.fc1.bias": make(4 * width),
                     b + "mlp.fc2.weight": make(width, 4 * width), b + "mlp.fc2.bias": make(width)})
    return ckpt


def tiny_imagebind_vit():
    """ImageBind's vision structure at toy size: pre-norm ViT, bias-free stem, LayerNorm eps 1e-6."""
    return VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                             pre_norm=True, num_classes=EMBED, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def direct_imagebind_blocks(ckpt, images):
    """ImageBind's vision trunk written out: Conv3d stem over two repeated frames, CLS + positions,
    pre-norm, then blocks of nn.MultiheadAttention and a GELU MLP; the patch tokens of every block."""
    pre, trunk = "modality_preprocessors.vision.", "modality_trunks.vision."
    b = images.shape[0]
    video = images.unsqueeze(2).repeat(1, 1, 2, 1, 1)
    x = F.conv3d(video, ckpt[pre + "rgbt_stem.proj.1.weight"], stride=(2, PATCH, PATCH))
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([ckpt[pre + "cls_token"].expand(b, -1, -1), x], dim=1) + ckpt[pre + "pos_embedding_helper.pos_embed"]
    x = F.layer_norm(x, (WIDTH,), ckpt[trunk + "pre_transformer_layer.0.weight"],
                     ckpt[trunk + "pre_transformer_layer.0.bias"], eps=1e-6)
    outputs = []
    for n in range(DEPTH):
        p = f"{trunk}blocks.{n}."
        attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        attn.load_state_dict({"in_proj_weight": ckpt[p + "attn.in_proj_weight"], "in_proj_bias": ckpt[p + "attn.in_proj_bias"],
                              "out_proj.weight": ckpt[p + "attn.out_proj.weight"], "out_proj.bias": ckpt[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (WIDTH,), ckpt[p + "norm_1.weight"], ckpt[p + "norm_1.bias"], eps=1e-6)
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (WIDTH,), ckpt[p + "norm_2.weight"], ckpt[p + "norm_2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, ckpt[p + "mlp.fc1.weight"], ckpt[p + "mlp.fc1.bias"])),
                         ckpt[p + "mlp.fc2.weight"], ckpt[p + "mlp.fc2.bias"])
        outputs.append(x[:, 1:].reshape(b, *grid, WIDTH).permute(0, 3, 1, 2))
    return outputs


@pytest.mark.parametrize("on_meta", [False, True])
def test_imagebind_mapping_gives_imagebinds_block_outputs(tmp_path, on_meta):
    ckpt = imagebind_checkpoint()
    path = tmp_path / "imagebind_tiny.pth"
    torch.save(ckpt, path)
    with torch.device("meta" if on_meta else "cpu"):  # on meta: built without weights, takes the file's tensors
        model = tiny_imagebind_vit()
    model = load_imagebind_weights(model, str(path), assign=on_meta)
    # every tensor of the ViT comes from the checkpoint (nothing left at its random initialisation)
    assert torch.equal(model.head.weight, ckpt["modality_heads.vision.2.weight"]) and not model.head.bias.any()
    assert torch.equal(model.norm.weight, ckpt["modality_heads.vision.0.weight"])
    extractor = ViTExtractor(model, "imagebind_tiny", blocks=[0, 1], image_size=SIZE)
    assert extractor.channels == [WIDTH, WIDTH] and extractor.feature_sizes == [(4, 4), (4, 4)]
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = direct_imagebind_blocks(ckpt, images)
    got = extractor(images)
    assert [tuple(f.shape) for f in got] == [(3, WIDTH, 4, 4)] * 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)
    with torch.inference_mode():  # the evaluation path
        torch.testing.assert_close(extractor(images)[1], expected[1], rtol=1e-5, atol=1e-4)


def test_bad_imagebind_checkpoints_fail_with_one_line(tmp_path):
    def attempt(ckpt, name):
        path = tmp_path / name
        torch.save(ckpt, path)
        with pytest.raises(UserError) as info:
            load_imagebind_weights(tiny_imagebind_vit(), str(path))
        assert "\n" not in str(info.value) and str(path) in str(info.value) and IMAGEBIND_URL in str(info.value)
        return str(info.value)

    missing = imagebind_checkpoint()
    del missing["modality_trunks.vision.blocks.1.mlp.fc2.bias"]
    assert "lacks the tensor for blocks.1.mlp.fc2.bias" in attempt(missing, "missing.pth")
    misshaped = imagebind_checkpoint(tokens=10)
    assert "pos_embed has shape (1, 10, 64)" in attempt(misshaped, "misshaped.pth")
    deeper = imagebind_checkpoint(depth=3)
    assert "blocks.2." in attempt(deeper, "deeper.pth")
    assert "not the ImageBind-Huge checkpoint" in attempt({"weight": torch.zeros(2)}, "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not the ImageBind-Huge checkpoint"):
        load_imagebind_weights(tiny_imagebind_vit(), str(tmp_path / "junk.pth"))
    # a missing file: the expected path and where the file is published, before any model is built
    with pytest.raises(UserError) as info:
        build_extractor("imagebind_huge", weights=str(tmp_path / "nowhere" / "imagebind_huge.pth"))
    message = str(info.value)
    assert "not found" in message and IMAGEBIND_URL in message and str(tmp_path / "nowhere") in message


def test_full_size_mapping_fills_every_vit_h_tensor():
    # ImageBind-Huge's published shapes against timm's ViT-H/14 (meta tensors: no memory, no time)
    with torch.device("meta"):
        model = imagebind_vit()
        ckpt = imagebind_checkpoint(width=1280, depth=32, tokens=257, embed=1024,
                                    make=lambda *shape: torch.empty(*shape, device="meta"))
    mapped = imagebind_to_timm(ckpt, model)
    assert set(mapped) == set(model.state_dict())
    assert mapped["patch_embed.proj.weight"].shape == (1280, 3, 14, 14)
    assert len(model.blocks) == 32 and evenly_spaced_blocks(32, 4) == [7, 15, 23, 31]
    assert isinstance(model.norm_pre, nn.LayerNorm) and model.norm_pre.eps == 1e-6


def test_main_ib_defaults_and_missing_weights_cli(tmp_path, capsys):
    import extract_ref_features
    from main_ib import parse_args
    from utils.errors import run_cli

    args = parse_args([])
    assert (args.backbone, args.flow_arch, args.coupling_layers) == ("imagebind_huge", "flow_model", 4)
    assert args.backbone_weights == "./pretrained_weights/imagebind/imagebind_huge.pth"
    assert args.feature_levels is None and args.feature_blocks is None  # a ViT's default: 4 evenly spaced blocks
    weights = tmp_path / "imagebind_huge.pth"
    status = run_cli(extract_ref_features.main, ["--backbone", "imagebind_huge", "--backbone_weights", str(weights),
                                                 "--dataset", "mvtec", "--few_shot_dir", str(tmp_path),
                                                 "--save_dir", str(tmp_path / "out"), "--device", "cpu"])
    errors = capsys.readouterr().err.splitlines()
    assert status == 2 and len(errors) == 1 and errors[0].startswith("error: --backbone_weights")
    assert str(weights) in errors[0] and IMAGEBIND_URL in errors[0]
    assert not (tmp_path / "out").exists()


def test_feature_level_flags():
    cnn = build_extractor(OFFLINE_BACKBONE, levels=4)
    assert cnn.channels == [24, 40, 112, 320] and cnn.feature_sizes[-1] == (7, 7) and cnn.layers == [1, 2, 3, 4]
    with pytest.raises(UserError, match="--feature_levels 5: .* at most 4"):
        build_extractor(OFFLINE_BACKBONE, levels=5)
    with pytest.raises(UserError, match="--feature_blocks: only for ViT"):
        build_extractor(OFFLINE_BACKBONE, blocks=[1, 2])
    with pytest.raises(UserError, match="disagrees"):
        build_extractor("vit_tiny_patch16_224", levels=3, blocks=[1, 2])


# --------------------------------------------------------------------------- any timm ViT, end to end

VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / f"{VIT}.pth"
    torch.save(timm.create_model(VIT, pretrained=False).state_dict(), path)
    return str(path)


def test_timm_vit_blocks_are_token_maps_of_the_file_weights(vit_weights):
    extractor = build_extractor(VIT, weights=vit_weights, blocks=[5, 2])
    assert extractor.layers == [2, 5] and extractor.channels == [192, 192] and extractor.feature_sizes == [(14, 14)] * 2
    assert len(extractor.model.blocks) == 6  # blocks after the last level are pruned
    reference = timm.create_model(VIT, pretrained=False).eval()
    reference.load_state_dict(torch.load(vit_weights, weights_only=True))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = reference.norm_pre(reference._pos_embed(reference.patch_embed(images)))
        tokens = []
        for blk in reference.blocks[:6]:
            x = blk(x)
            tokens.append(x[:, 1:].transpose(1, 2).reshape(2, 192, 14, 14))
    got = extractor(images)
    assert torch.allclose(got[0], tokens[2], atol=1e-5) and torch.allclose(got[1], tokens[5], atol=1e-5)
    assert extractor.describe()["layers"] == [2, 5] and extractor.describe()["kind"] == "vit"
    assert evenly_spaced_blocks(len(reference.blocks), 4) == [2, 5, 8, 11]


def test_timm_vit_end_to_end(vit_weights, tmp_path, capsys):
    root = generate_demo_dataset(str(tmp_path / "demo"), n_train=4, n_test_good=2, n_test_anomalous=2)
    extractor = build_extractor(VIT, weights=vit_weights, blocks=[2, 5])
    refs = tmp_path / "refs"
    extract_reference_features("demo", root, str(refs), extractor, shots=2, classes=DEMO_UNSEEN, batch_size=4)
    meta = json.loads((refs / DEMO_UNSEEN[0] / "meta.json").read_text())
    assert meta["backbone"] == VIT and meta["layers"] == [2, 5]
    assert sorted(os.listdir(refs / DEMO_UNSEEN[0])) == ["layer1.npy", "layer2.npy", "meta.json"]
    assert np.load(refs / DEMO_UNSEEN[0] / "layer2.npy").shape == (2 * 196, 192)
    with pytest.raises(UserError, match="layers \\[2, 5\\].*re-extract"):  # features of other blocks are refused
        load_reference_bank(str(refs), DEMO_UNSEEN[0], dict(extractor.describe(), layers=[3, 5]), 2)
    with pytest.raises(UserError, match="extracted with --backbone vit_tiny"):  # ... and of another backbone
        load_reference_bank(str(refs), DEMO_UNSEEN[0], dict(extractor.describe(), backbone="imagebind_huge"), 2)

    args = add_training_arguments(Parser()).parse_args([])
    vars(args).update(setting="demo", train_dataset_dir=root, test_dataset_dir=root, test_ref_feature_dir=str(refs),
                      backbone=VIT, backbone_weights=vit_weights, feature_blocks=[2, 5], num_ref_shot=2,
                      train_ref_shot=2, train_ref_pool=2, epochs=1, stage1_epochs=1, batch_size=8,
                      eval_batch_size=8, num_workers=0, checkpoint_path=str(tmp_path / "runs"), coupling_layers=2,
                      num_embeddings=32, num_heatmaps=0, device="cpu", flow_arch="flow_model", lr=1e-4)
    tables = fit(args, shots=[2], run_names={2: "vit"}, extractor=extractor)
    frame = pd.read_csv(tmp_path / "runs" / "vit" / "vit_epoch1_metrics.csv")
    assert frame["Class Name"].tolist() == list(DEMO_UNSEEN) + ["Mean"]
    values = frame.drop(columns="Class Name").to_numpy()
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    assert tables[2].iloc[-1]["Pixel AUC"] == pytest.approx(frame.iloc[-1]["Pixel AUC"], abs=1e-4)
    latest = torch.load(tmp_path / "runs" / "vit" / "vit_latest.pth", weights_only=False)
    assert latest["trained_on"]["layers"] == [2, 5] and latest["trained_on"]["channels"] == [192, 192]
    assert len(latest["trainer"]["boundaries"]["values"]) == 2
    # resuming with other blocks is refused
    other = SimpleNamespace(name=VIT, channels=[192, 192], layers=[3, 5])
    with pytest.raises(UserError, match="layers \\[2, 5\\].*--feature_blocks"):
        checkpoint.check_resume(latest, "vit_latest.pth", "demo", other, checkpoint.model_config(latest))
    # main_ib.py on the same data: the ImageBind weights file is checked before anything is built
    from main_ib import main as main_ib
    from utils.errors import run_cli

    missing = tmp_path / "pretrained" / "imagebind_huge.pth"
    capsys.readouterr()
    assert run_cli(main_ib, ["--setting", "demo", "--train_dataset_dir", root, "--test_dataset_dir", root,
                             "--checkpoint_path", str(tmp_path / "ib"), "--backbone_weights", str(missing),
                             "--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--train_ref_shot", "2",
                             "--train_ref_pool", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: --backbone_weights") and str(missing) in errors[0] and IMAGEBIND_URL in errors[0]
