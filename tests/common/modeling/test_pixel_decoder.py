"""The MSDeformAttn pixel decoder: builds from cfg through the registry, output shapes, backward,
Mask2Former-compatible parameter names, autocast, and a configuration without FPN levels."""

from __future__ import annotations

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

import common.modeling  # noqa: F401  (registers the backbones and pixel decoder)
from common.engine.model_defaults import add_model_config
from common.modeling.pixel_decoder import QSMSDeformAttnPixelDecoder

INPUT_SHAPE = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=32, stride=8),
    "res4": ShapeSpec(channels=48, stride=16),
    "res5": ShapeSpec(channels=64, stride=32),
}


def make_cfg(**overrides):
    cfg = get_cfg()
    add_model_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 40
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 2
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def make_features(h=64, w=96, batch=2, shape=INPUT_SHAPE):
    g = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(batch, v.channels, h // v.stride, w // v.stride, generator=g)
        for k, v in shape.items()
    }


def test_builds_from_cfg_shapes_and_backward():
    torch.manual_seed(0)
    cfg = make_cfg()
    decoder = SEM_SEG_HEADS_REGISTRY.get("QSMSDeformAttnPixelDecoder")(cfg, INPUT_SHAPE)
    assert isinstance(decoder, QSMSDeformAttnPixelDecoder)
    assert decoder.transformer_in_features == ["res3", "res4", "res5"]
    assert decoder.num_fpn_levels == 1 and decoder.fpn_features == ["res2"]
    feats = make_features()
    mask_features, encoder_features, multi_scale = decoder(feats)
    assert mask_features.shape == (2, 40, 16, 24)
    assert encoder_features.shape == (2, 64, 2, 3)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 64, 2, 3), (2, 64, 4, 6), (2, 64, 8, 12)]
    loss = mask_features.square().mean() + sum(f.square().mean() for f in multi_scale)
    loss.backward()
    no_grad = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    # (level_embed's gradient is zero at init: it only feeds the zero-initialised offset and
    # attention-weight projections, exactly as in Mask2Former.)
    attn = decoder.transformer.encoder.layers[0].self_attn
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert attn.attention_weights.weight.grad.abs().sum() > 0


def test_mask2former_parameter_names():
    decoder = QSMSDeformAttnPixelDecoder(make_cfg(), INPUT_SHAPE)
    keys = set(decoder.state_dict())
    for key in (
        "input_proj.0.0.weight",  # res5 projection (coarse first)
        "input_proj.2.1.weight",  # res3 GroupNorm
        "transformer.level_embed",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.linear1.weight",
        "adapter_1.weight",
        "adapter_1.norm.weight",
        "layer_1.weight",
        "mask_features.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith(("lateral_convs", "output_convs")) for k in keys)
    assert decoder.transformer.level_embed.shape == (3, 64)


def test_encoder_only_levels_and_sizes_not_multiple():
    """IN_FEATURES = res3..res5 with COMMON_STRIDE 8: no FPN level; odd map sizes."""
    shape = {k: v for k, v in INPUT_SHAPE.items() if k != "res2"}
    cfg = make_cfg(
        **{
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["res3", "res4", "res5"],
            "MODEL.SEM_SEG_HEAD.COMMON_STRIDE": 8,
            "MODEL.MSDA_PIXEL_DECODER.NUM_POINTS": 2,
        }
    )
    decoder = QSMSDeformAttnPixelDecoder(cfg, shape)
    assert decoder.num_fpn_levels == 0
    feats = {
        "res3": torch.randn(1, 32, 9, 13),
        "res4": torch.randn(1, 48, 5, 7),
        "res5": torch.randn(1, 64, 3, 4),
    }
    mask_features, encoder_features, multi_scale = decoder(feats)
    assert mask_features.shape == (1, 40, 9, 13)
    assert encoder_features.shape == (1, 64, 3, 4)
    assert [f.shape[-2:] for f in multi_scale] == [(3, 4), (5, 7), (9, 13)]


def test_autocast_bfloat16():
    torch.manual_seed(0)
    decoder = QSMSDeformAttnPixelDecoder(make_cfg(), INPUT_SHAPE)
    feats = make_features(batch=1)
    ref = decoder(feats)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder(feats)[0]
    assert torch.isfinite(out.float()).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.1, rel


def test_bad_transformer_features():
    cfg = make_cfg(**{"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res6"]})
    with pytest.raises(ValueError, match="subset"):
        QSMSDeformAttnPixelDecoder(cfg, INPUT_SHAPE)
