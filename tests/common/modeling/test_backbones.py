"""Backbones built from YAML: R50-d, R50-d-DCN, R-50-D8 (dilated V1c) and a small Swin-T; their
strides and channels, one training step each, Swin's window padding, parity with timm's resnet50d
and the weight converters."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import common.modeling  # noqa: F401  (registers the backbones and pixel decoder)
from common.engine.model_defaults import add_model_config
from common.modeling.backbones.resnet_vd import (
    AvgDownConv2d,
    DeepStem,
    ResNetVd,
    convert_resnet_weights,
    make_resnet_vd,
)
from common.modeling.backbones.swin import (
    SwinBackbone,
    _shift_mask,
    _swin_block,
    convert_swin_weights,
)
from common.ops.deform_conv import DeformConv

R50_CHANNELS = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}

YAMLS = {
    "R50-d": """
MODEL:
  BACKBONE: {NAME: build_resnet_vd_backbone, FREEZE_AT: 0}
  RESNETS:
    DEPTH: 50
    NORM: BN
    DEEP_STEM: True
    AVG_DOWN: True
    OUT_FEATURES: [res2, res3, res4, res5]
""",
    "R50-d-DCN": """
MODEL:
  BACKBONE: {NAME: build_resnet_vd_backbone, FREEZE_AT: 0}
  RESNETS:
    DEPTH: 50
    NORM: FrozenBN
    DEEP_STEM: True
    AVG_DOWN: True
    DEFORM_ON_PER_STAGE: [False, False, True, True]
    OUT_FEATURES: [res2, res3, res4, res5]
""",
    "R-50-D8": """
MODEL:
  BACKBONE: {NAME: build_resnet_vd_backbone, FREEZE_AT: 0}
  RESNETS:
    DEPTH: 50
    NORM: BN
    DEEP_STEM: True
    AVG_DOWN: False
    RES4_DILATION: 2
    RES5_DILATION: 4
    CONTRACT_DILATION: True
    OUT_FEATURES: [res2, res3, res4, res5]
""",
    "Swin-T-small": """
MODEL:
  BACKBONE: {NAME: build_swin_backbone}
  SWIN:
    EMBED_DIM: 24
    DEPTHS: [2, 2, 2, 2]
    NUM_HEADS: [1, 2, 4, 8]
    WINDOW_SIZE: 7
    DROP_PATH_RATE: 0.1
    OUT_FEATURES: [res2, res3, res4, res5]
""",
}

EXPECTED = {
    "R50-d": ({"res2": 4, "res3": 8, "res4": 16, "res5": 32}, R50_CHANNELS),
    "R50-d-DCN": ({"res2": 4, "res3": 8, "res4": 16, "res5": 32}, R50_CHANNELS),
    "R-50-D8": ({"res2": 4, "res3": 8, "res4": 8, "res5": 8}, R50_CHANNELS),
    "Swin-T-small": (
        {"res2": 4, "res3": 8, "res4": 16, "res5": 32},
        {"res2": 24, "res3": 48, "res4": 96, "res5": 192},
    ),
}


# Overrides that shrink a model for the training step on CPU (the structure stays the same).
TINY = {
    "resnet": [
        "MODEL.RESNETS.WIDTH_PER_GROUP",
        8,
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        32,
        "MODEL.RESNETS.STEM_OUT_CHANNELS",
        16,
    ],
    "swin": ["MODEL.SWIN.DROP_PATH_RATE", 0.0],  # every block gets a gradient in one step
}


def build_from_yaml(text: str, tmp_path, opts=()):
    path = tmp_path / "backbone.yaml"
    path.write_text(text)
    cfg = get_cfg()
    add_model_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    return build_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("name", list(YAMLS))
def test_backbone_strides_and_channels(name, tmp_path):
    backbone = build_from_yaml(YAMLS[name], tmp_path)
    strides, channels = EXPECTED[name]
    shapes = backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == strides
    assert {k: v.channels for k, v in shapes.items()} == channels
    assert backbone.size_divisibility == max(strides.values())


@pytest.mark.parametrize("name", list(YAMLS))
def test_backbone_train_step(name, tmp_path):
    torch.manual_seed(0)
    is_swin = name.startswith("Swin")
    backbone = build_from_yaml(YAMLS[name], tmp_path, TINY["swin" if is_swin else "resnet"])
    strides, channels = EXPECTED[name]
    if not is_swin:
        channels = {k: c // 8 for k, c in channels.items()}
    h, w = 64, 64
    backbone.train()
    feats = backbone(torch.randn(2, 3, h, w))
    for k, f in feats.items():
        assert f.shape == (2, channels[k], h // strides[k], w // strides[k]), k
    params = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.1)
    sum(f.float().pow(2).mean() for f in feats.values()).backward()
    opt.step()
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient: {no_grad}"
    changed = [n for n, p in params.items() if not p.equal(before[n])]
    assert len(changed) > 0.8 * len(params), f"{len(changed)}/{len(params)} updated"


def test_resnet_vd_structure(tmp_path):
    backbone = build_from_yaml(YAMLS["R50-d-DCN"], tmp_path)
    assert isinstance(backbone, ResNetVd) and isinstance(backbone.stem, DeepStem)
    assert [backbone.stem.conv1.out_channels, backbone.stem.conv3.out_channels] == [32, 64]
    assert isinstance(backbone.res3[0].shortcut, AvgDownConv2d)
    assert backbone.res3[0].shortcut.pool_stride == 2
    assert not isinstance(backbone.res2[0].shortcut, AvgDownConv2d)  # stride 1: plain 1x1
    assert not hasattr(backbone.res3[0], "conv2_offset")
    assert all(isinstance(b.conv2, DeformConv) for s in (backbone.res4, backbone.res5) for b in s)
    keys = backbone.state_dict().keys()
    for key in ("stem.conv2.weight", "res4.0.conv2_offset.weight", "res3.0.shortcut.norm.weight"):
        assert key in keys


def test_resnet_d8_dilations(tmp_path):
    backbone = build_from_yaml(YAMLS["R-50-D8"], tmp_path)
    dil = {s: [b.conv2.dilation for b in getattr(backbone, s)] for s in ("res3", "res4", "res5")}
    assert dil["res3"] == [(1, 1)] * 4
    assert dil["res4"] == [(1, 1)] + [(2, 2)] * 5  # contract_dilation: first block halves
    assert dil["res5"] == [(2, 2)] + [(4, 4)] * 2
    assert backbone.res5[0].conv2.stride == (1, 1)


@pytest.mark.parametrize("hw", [(37, 50)])
def test_swin_arbitrary_sizes(hw):
    torch.manual_seed(0)
    swin = SwinBackbone(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)).eval()
    x = torch.randn(1, 3, *hw)
    feats = swin(x)
    for i, k in enumerate(("res2", "res3", "res4", "res5")):
        s = 4 * 2**i
        assert feats[k].shape == (1, 16 * 2**i, math.ceil(hw[0] / s), math.ceil(hw[1] / s))
    # Only res2/res3 requested: later stages and norms are not built.
    small = SwinBackbone(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), out_features=("res2", "res3")
    )
    assert len(small.layers) == 2 and not hasattr(small, "norm2")
    assert sorted(small(x)) == ["res2", "res3"]


def test_swin_block_matches_timm_when_divisible():
    """Our pad-then-shift block equals timm's block when no padding is needed."""
    torch.manual_seed(0)
    swin = SwinBackbone(embed_dim=16, depths=(2,), num_heads=(2,), out_features=("res2",)).eval()
    block = swin.layers[0].blocks[1]  # shifted block
    x = torch.randn(2, 14, 21, 16)
    mask = _shift_mask(14, 21, 7, 3, x)
    with torch.no_grad():
        ours = _swin_block(block, x, 7, 3, mask)
        theirs = block(x)
    torch.testing.assert_close(ours, theirs)


def test_swin_fpn_and_checkpointing(tmp_path):
    cfg_text = YAMLS["Swin-T-small"].replace("build_swin_backbone", "build_swin_fpn_backbone")
    cfg_text += "    USE_CHECKPOINT: True\n  FPN:\n    IN_FEATURES: [res2, res3, res4, res5]\n"
    cfg_text += "    OUT_CHANNELS: 32\n"
    fpn = build_from_yaml(cfg_text, tmp_path)
    fpn.train()
    out = fpn(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in out.items()} == {
        "p2": 16,
        "p3": 8,
        "p4": 4,
        "p5": 2,
        "p6": 1,
    }
    sum(v.mean() for v in out.values()).backward()
    assert fpn.bottom_up.layers[0].blocks[0].attn.qkv.weight.grad is not None


def test_resnet_vd_matches_timm_resnet50d():
    """R50-d built here == timm's resnet50d after convert_resnet_weights (deep stem, avg-down)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnet50d", pretrained=False).eval()
    for m in ref.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = make_resnet_vd(norm="BN", deep_stem=True, avg_down=True, out_features=("res5",)).eval()
    missing, unexpected = ours.load_state_dict(convert_resnet_weights(ref.state_dict()))
    assert not missing and not unexpected
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["res5"], ref.forward_features(x), rtol=1e-4, atol=1e-4)


def test_convert_mmcv_resnet_names():
    w = torch.zeros(1)
    mmcv = {
        "backbone.stem.0.weight": w,
        "backbone.stem.7.running_var": w,
        "backbone.layer1.0.downsample.0.weight": w,  # no avg-down: 0 = conv, 1 = bn
        "backbone.layer1.0.downsample.1.bias": w,
        "backbone.layer3.2.conv2.conv_offset.bias": w,  # mmdet DCN
        "backbone.layer4.0.bn3.weight": w,
        "backbone.fc.weight": w,
    }
    assert sorted(convert_resnet_weights({"state_dict": mmcv})) == [
        "res2.0.shortcut.norm.bias",
        "res2.0.shortcut.weight",
        "res4.2.conv2_offset.bias",
        "res5.0.conv3.norm.weight",
        "stem.conv1.weight",
        "stem.conv3.norm.running_var",
    ]
    plain = convert_resnet_weights({"conv1.weight": w, "bn1.bias": w})  # torchvision stem
    assert sorted(plain) == ["stem.conv1.norm.bias", "stem.conv1.weight"]


def test_convert_official_swin_weights():
    swin = SwinBackbone(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
    ours = swin.state_dict()
    official = {}
    for k, v in ours.items():  # official layout: downsample at the end of the previous stage
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        official[k] = v.clone()
    official["layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(49, 49)
    official["norm.weight"] = torch.ones(128)
    official["head.weight"] = torch.zeros(10, 128)
    converted = convert_swin_weights({"model": official})
    assert converted.keys() == ours.keys()
    swin.load_state_dict(converted)
