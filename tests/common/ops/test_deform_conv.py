"""Deformable convolution on torchvision: equals a plain conv at zero offset, (dy, dx) layout,
AMP dtypes, and Detectron2's ResNet/FPN with DCN stages built from cfg (CPU forward/backward,
Detectron2-format weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from common.engine.launch import patch_detectron2
from common.engine.model_defaults import add_model_config
from common.ops.deform_conv import DeformConv, ModulatedDeformConv

patch_detectron2()  # the start-up call train_net.py makes (setup_queryseg)


def _conv_args(groups=1):
    return {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2, "groups": groups}


@pytest.mark.parametrize("groups,deformable_groups", [(1, 1), (2, 2)])
def test_zero_offset_equals_conv(groups, deformable_groups):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    args = _conv_args(groups)
    dcn = DeformConv(8, 6, deformable_groups=deformable_groups, **args).double()
    mdcn = ModulatedDeformConv(8, 6, deformable_groups=deformable_groups, **args).double()
    nn.init.normal_(mdcn.bias)
    out_hw = (6, 5)
    offset = torch.zeros(2, 2 * deformable_groups * 9, *out_hw, dtype=torch.float64)
    mask = torch.ones(2, deformable_groups * 9, *out_hw, dtype=torch.float64)
    conv_kw = {"stride": 2, "padding": 2, "dilation": 2, "groups": groups}
    torch.testing.assert_close(dcn(x, offset), F.conv2d(x, dcn.weight, **conv_kw))
    torch.testing.assert_close(
        mdcn(x, offset, mask), F.conv2d(x, mdcn.weight, mdcn.bias, **conv_kw)
    )
    # a constant mask scales the output (bias excluded)
    half = mdcn(x, offset, mask * 0.5) - mdcn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(half, 0.5 * F.conv2d(x, mdcn.weight, **conv_kw))


def test_offset_layout_is_dy_dx():
    """Channel 2k is dy and 2k+1 is dx of tap k (Detectron2's layout): dx = 1 shifts left."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    dcn = DeformConv(3, 4, 3, padding=1).double()
    offset = torch.zeros(1, 18, 8, 8, dtype=torch.float64)
    offset[:, 1::2] = 1.0  # dx = 1 at every tap
    # out[j] = sum_kx w[kx] * x[j + kx + 1], kx in {-1, 0, 1}: a valid conv over x padded by
    # (left 0, right 2) in width and (1, 1) in height.
    expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), dcn.weight)
    torch.testing.assert_close(dcn(x, offset), expected)


def test_gradients_and_norm_activation():
    torch.manual_seed(0)
    dcn = DeformConv(4, 5, 3, padding=1, norm=nn.BatchNorm2d(5), activation=F.relu)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    offset = (torch.randn(2, 18, 7, 7) * 0.7).requires_grad_()
    out = dcn(x, offset)
    assert out.shape == (2, 5, 7, 7) and (out >= 0).all()
    out.square().sum().backward()
    for t in (x, offset, dcn.weight, dcn.norm.weight):
        assert t.grad is not None and t.grad.abs().sum() > 0
    # empty batch keeps the graph connected
    empty = dcn(torch.zeros(0, 4, 7, 7), torch.zeros(0, 18, 7, 7))
    assert empty.shape == (0, 5, 7, 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_autocast(dtype):
    torch.manual_seed(0)
    mdcn = ModulatedDeformConv(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 9, 9)
    offset = torch.randn(2, 18, 9, 9) * 0.5
    mask = torch.rand(2, 9, 9, 9)
    ref = mdcn(x, offset, mask)
    out = mdcn(x.to(dtype), offset.to(dtype), mask.to(dtype))  # low-precision inputs
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.conv2d(x, torch.randn(4, 4, 1, 1))  # bfloat16 under autocast
        out = mdcn(y, offset, mask)
    assert out.dtype == y.dtype == torch.bfloat16
    out.float().sum().backward()
    assert mdcn.weight.grad is not None and mdcn.weight.grad.dtype == torch.float32


def _dcn_cfg(name="build_resnet_backbone", modulated=False):
    cfg = get_cfg()
    add_model_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 16  # a quarter-width R50 keeps the CPU test fast
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    cfg.MODEL.RESNETS.DEFORM_MODULATED = modulated
    return cfg


def test_detectron2_resnet_uses_project_dcn():
    import detectron2.modeling.backbone.resnet as d2_resnet

    assert d2_resnet.DeformConv is DeformConv
    assert d2_resnet.ModulatedDeformConv is ModulatedDeformConv


@pytest.mark.parametrize("modulated", [False, True])
def test_detectron2_resnet_dcn_forward_backward(modulated):
    torch.manual_seed(0)
    backbone = build_backbone(_dcn_cfg(modulated=modulated), ShapeSpec(channels=3))
    block = backbone.res3[0]
    assert isinstance(block.conv2, ModulatedDeformConv if modulated else DeformConv)
    assert block.conv2_offset.out_channels == (27 if modulated else 18)
    assert not hasattr(backbone.res2[0], "conv2_offset")
    x = torch.randn(2, 3, 64, 64)
    feats = backbone(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "res2": (2, 64, 16, 16),
        "res3": (2, 128, 8, 8),
        "res4": (2, 256, 4, 4),
        "res5": (2, 512, 2, 2),
    }
    sum(f.mean() for f in feats.values()).backward()
    assert block.conv2.weight.grad.abs().sum() > 0
    assert block.conv2_offset.weight.grad.abs().sum() > 0  # offsets are learned


def test_detectron2_resnet_fpn_dcn_builds():
    cfg = _dcn_cfg("build_resnet_fpn_backbone")
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    fpn = build_backbone(cfg, ShapeSpec(channels=3))
    out = fpn(torch.randn(1, 3, 64, 64))
    assert sorted(out) == ["p2", "p3", "p4", "p5", "p6"]
    out["p2"].mean().backward()


def test_loads_detectron2_format_weights(tmp_path):
    """A Detectron2 checkpoint of a DCN ResNet ({"model": {"backbone.res3.0.conv2.weight"...}})."""
    torch.manual_seed(0)
    cfg = _dcn_cfg()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone(cfg, ShapeSpec(channels=3))

    src = Wrapper()
    state = src.state_dict()
    for key in ("res3.0.conv2.weight", "res3.0.conv2_offset.weight", "res3.0.conv2_offset.bias"):
        assert f"backbone.{key}" in state
    assert "backbone.res3.0.conv2.bias" not in state  # Detectron2's DeformConv has no bias
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": state}, tmp_path / "model_final.pth")
    dst = Wrapper()
    result = DetectionCheckpointer(dst).load(str(tmp_path / "model_final.pth"))
    assert result.get("model") is None  # the model weights are consumed
    loaded = dst.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
