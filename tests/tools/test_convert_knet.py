"""tools/convert_knet.py: official K-Net checkpoints (mmdet instance / panoptic, mmseg semantic)
-> QuerySeg.

The official state dicts are built here from the spec (``knet_queryinst.md`` A7 and the module
definitions of A1/A2), independently of the converter: exact key names and shapes. Key/shape
coverage runs on the ``meta`` device (full-size models, no memory, no init time); the functional
checks (update head with the mmcv attention layout, conv modules, semantic decode head + chunked
updator, class order, Swin patch merging) run small CPU inputs through converted weights and
compare with the official computation written out here.
"""

from __future__ import annotations

import os

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch.nn import functional as F

from common.convert.core import (
    CheckpointError,
    check_against_model,
    convert_state_dict,
    permute_rows,
)
from common.convert.rules import swin_rules
from common.engine import get_cfg, merge_config
from common.engine.checkpoint import QSCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import convert_knet as ck  # noqa: E402

CONFIGS = os.path.join(REPO, "projects", "knet", "configs")


# --------------------------------------------------------------------------------------------
# Official layouts (spec A7), written from the module definitions
# --------------------------------------------------------------------------------------------


class Fill:
    """Tensor factory: ``meta`` tensors (shapes only) or seeded random CPU tensors."""

    def __init__(self, device: str = "meta", seed: int = 0):
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, positive: bool = False) -> torch.Tensor:
        if self.device == "meta":
            return torch.empty(shape, device="meta")
        if positive:
            return torch.rand(shape, generator=self.gen) + 0.5
        return torch.randn(shape, generator=self.gen) * 0.1

    def long(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.long, device=self.device)


def _affine(sd, fill, prefix, c):
    sd[f"{prefix}.weight"] = fill(c) + (1.0 if fill.device != "meta" else 0)
    sd[f"{prefix}.bias"] = fill(c)


def _bn(sd, fill, prefix, c):
    _affine(sd, fill, prefix, c)
    sd[f"{prefix}.running_mean"] = fill(c)
    sd[f"{prefix}.running_var"] = fill(c, positive=True)
    sd[f"{prefix}.num_batches_tracked"] = fill.long()


def _linear(sd, fill, prefix, cout, cin, bias=True):
    sd[f"{prefix}.weight"] = fill(cout, cin)
    if bias:
        sd[f"{prefix}.bias"] = fill(cout)


def _conv_module(sd, fill, prefix, cout, cin, k, norm):
    """mmcv ConvModule: ``conv`` (bias only without a norm) + ``gn``/``bn``."""
    sd[f"{prefix}.conv.weight"] = fill(cout, cin, k, k)
    if norm == "gn":
        _affine(sd, fill, f"{prefix}.gn", cout)
    elif norm == "bn":
        _bn(sd, fill, f"{prefix}.bn", cout)
    else:
        sd[f"{prefix}.conv.bias"] = fill(cout)


def mmcv_resnet(fill, depth=50, dcn=False, deep_stem=False, p="backbone."):
    """mmdet ResNet (pytorch style) / mmseg ResNetV1c (``stem.{0,1,3,4,6,7}``); DCN: mmcv
    ``DeformConv2dPack`` in conv2 of res3-res5 (``conv2.conv_offset``, 18 channels)."""
    sd = {}
    if deep_stem:
        for conv, bn, cin, cout in ((0, 1, 3, 32), (3, 4, 32, 32), (6, 7, 32, 64)):
            sd[f"{p}stem.{conv}.weight"] = fill(cout, cin, 3, 3)
            _bn(sd, fill, f"{p}stem.{bn}", cout)
    else:
        sd[f"{p}conv1.weight"] = fill(64, 3, 7, 7)
        _bn(sd, fill, f"{p}bn1", 64)
    cin = 64
    for n, blocks in enumerate({50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth], start=1):
        width = 64 * 2 ** (n - 1)
        cout = 4 * width
        for i in range(blocks):
            b = f"{p}layer{n}.{i}."
            sd[b + "conv1.weight"] = fill(width, cin if i == 0 else cout, 1, 1)
            sd[b + "conv2.weight"] = fill(width, width, 3, 3)
            if dcn and n > 1:
                sd[b + "conv2.conv_offset.weight"] = fill(18, width, 3, 3)
                sd[b + "conv2.conv_offset.bias"] = fill(18)
            sd[b + "conv3.weight"] = fill(cout, width, 1, 1)
            for k, c in ((1, width), (2, width), (3, cout)):
                _bn(sd, fill, f"{b}bn{k}", c)
            if i == 0:
                sd[b + "downsample.0.weight"] = fill(cout, cin, 1, 1)
                _bn(sd, fill, f"{b}downsample.1", cout)
        cin = cout
    return sd


def mmcv_swin(fill, embed, depths, heads, window=7, p="backbone."):
    """mmdet/mmseg SwinTransformer: ``patch_embed.projection``, ``stages.i.blocks.j.attn.w_msa``,
    ``ffn.layers.{0.0,1}``, ``stages.i.downsample.{norm,reduction}`` (end of stage i), norm0-3."""
    sd = {}
    sd[f"{p}patch_embed.projection.weight"] = fill(embed, 3, 4, 4)
    sd[f"{p}patch_embed.projection.bias"] = fill(embed)
    _affine(sd, fill, f"{p}patch_embed.norm", embed)
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        for j in range(depth):
            b = f"{p}stages.{i}.blocks.{j}."
            _affine(sd, fill, b + "norm1", c)
            sd[b + "attn.w_msa.relative_position_bias_table"] = fill((2 * window - 1) ** 2, h)
            sd[b + "attn.w_msa.relative_position_index"] = fill.long(window**2, window**2)
            _linear(sd, fill, b + "attn.w_msa.qkv", 3 * c, c)
            _linear(sd, fill, b + "attn.w_msa.proj", c, c)
            _affine(sd, fill, b + "norm2", c)
            _linear(sd, fill, b + "ffn.layers.0.0", 4 * c, c)
            _linear(sd, fill, b + "ffn.layers.1", c, 4 * c)
        if i < len(depths) - 1:
            _affine(sd, fill, f"{p}stages.{i}.downsample.norm", 4 * c)
            sd[f"{p}stages.{i}.downsample.reduction.weight"] = fill(2 * c, 4 * c)
        _affine(sd, fill, f"{p}norm{i}", c)
    return sd


def mmdet_fpn(fill, in_channels, c=256):
    sd = {}
    for i, cin in enumerate(in_channels):
        _conv_module(sd, fill, f"neck.lateral_convs.{i}", c, cin, 1, None)
        _conv_module(sd, fill, f"neck.fpn_convs.{i}", c, c, 3, None)
    return sd


def knet_rpn_head(fill, num_classes, n=100, c=256):
    """``ConvKernelHead`` with its ``SemanticFPNWrapper`` (GN ConvModules)."""
    sd = {}
    levels = {0: 1, 1: 1, 2: 2, 3: 3}  # convs per level (P2 stride-2 conv; P4, P5 upsampling)
    for lvl, num in levels.items():
        for j in range(num):
            _conv_module(sd, fill, f"rpn_head.localization_fpn.convs_all_levels.{lvl}.conv{j}",
                         c, c, 3, "gn")  # fmt: skip
    for name in ("localization_fpn.conv_pred", "localization_fpn.aux_convs.0", "loc_convs.0",
                 "seg_convs.0"):  # fmt: skip
        _conv_module(sd, fill, f"rpn_head.{name}", c, c, 1, "gn")
    sd["rpn_head.init_kernels.weight"] = fill(n, c, 1, 1)
    sd["rpn_head.conv_seg.weight"] = fill(num_classes, c, 1, 1)
    sd["rpn_head.conv_seg.bias"] = fill(num_classes)
    return sd


def knet_update_head(fill, p, c=256, num_classes=None, upd=256, ffn=2048):
    """``KernelUpdateHead``: mmcv MultiheadAttention (``attention.attn``), ``KernelUpdator``,
    FFN, cls/mask fcs (Linear no bias + LN)."""
    sd = {}
    sd[p + "attention.attn.in_proj_weight"] = fill(3 * c, c)
    sd[p + "attention.attn.in_proj_bias"] = fill(3 * c)
    _linear(sd, fill, p + "attention.attn.out_proj", c, c)
    _affine(sd, fill, p + "attention_norm", c)
    _linear(sd, fill, p + "kernel_update_conv.dynamic_layer", 2 * upd, upd)
    _linear(sd, fill, p + "kernel_update_conv.input_layer", 2 * upd, upd)
    for name in ("input_gate", "update_gate", "fc_layer"):
        _linear(sd, fill, p + f"kernel_update_conv.{name}", upd, upd)
    for name in ("norm_in", "norm_out", "input_norm_in", "input_norm_out", "fc_norm"):
        _affine(sd, fill, p + f"kernel_update_conv.{name}", upd)
    _conv_module(sd, fill, p + "feat_transform", c, c, 1, None)
    _linear(sd, fill, p + "ffn.layers.0.0", ffn, c)
    _linear(sd, fill, p + "ffn.layers.1", c, ffn)
    _affine(sd, fill, p + "ffn_norm", c)
    if num_classes is not None:
        _linear(sd, fill, p + "cls_fcs.0", c, c, bias=False)
        _affine(sd, fill, p + "cls_fcs.1", c)
        _linear(sd, fill, p + "fc_cls", num_classes, c)
    _linear(sd, fill, p + "mask_fcs.0", c, c, bias=False)
    _affine(sd, fill, p + "mask_fcs.1", c)
    _linear(sd, fill, p + "fc_mask", c, c)
    return sd


def knet_det(fill, num_classes, backbone):
    """A ZwwWayne/K-Net detection ``state_dict`` (instance: 80 classes, panoptic: 133)."""
    kind, *args = backbone
    if kind == "swin":
        sd = mmcv_swin(fill, *args)
        in_channels = [args[0] * 2**i for i in range(4)]
    else:
        sd = mmcv_resnet(fill, *args)
        in_channels = [256, 512, 1024, 2048]
    sd.update(mmdet_fpn(fill, in_channels))
    sd.update(knet_rpn_head(fill, num_classes))
    for s in range(3):
        sd.update(knet_update_head(fill, f"roi_head.mask_head.{s}.", num_classes=num_classes))
    return sd


def mmseg_decode_head(fill, kind, in_channels, c, num_classes=150):
    p = "decode_head.kernel_generate_head."
    sd = {}
    top = in_channels[-1]
    if kind == "FCN":
        _conv_module(sd, fill, p + "convs.0", c, top, 3, "bn")
        _conv_module(sd, fill, p + "convs.1", c, c, 3, "bn")
        _conv_module(sd, fill, p + "conv_cat", c, top + c, 3, "bn")
    elif kind == "ASPP":
        _conv_module(sd, fill, p + "image_pool.1", c, top, 1, "bn")
        for i, k in enumerate((1, 3, 3, 3)):
            _conv_module(sd, fill, p + f"aspp_modules.{i}", c, top, k, "bn")
        _conv_module(sd, fill, p + "bottleneck", c, 5 * c, 3, "bn")
    else:  # PSP, UPer: pyramid pooling on the coarsest map
        for i in range(4):
            _conv_module(sd, fill, p + f"psp_modules.{i}.1", c, top, 1, "bn")
        _conv_module(sd, fill, p + "bottleneck", c, top + 4 * c, 3, "bn")
    if kind == "UPER":
        for i, cin in enumerate(in_channels[:-1]):
            _conv_module(sd, fill, p + f"lateral_convs.{i}", c, cin, 1, "bn")
            _conv_module(sd, fill, p + f"fpn_convs.{i}", c, c, 3, "bn")
        _conv_module(sd, fill, p + "fpn_bottleneck", c, 4 * c, 3, "bn")
    sd[p + "conv_seg.weight"] = fill(num_classes, c, 1, 1)
    sd[p + "conv_seg.bias"] = fill(num_classes)
    return sd


def knet_seg(fill, kind, backbone, c):
    """An mmseg K-Net ``state_dict``: backbone, ``IterativeDecodeHead``, FCN auxiliary head."""
    if backbone[0] == "swin":
        sd = mmcv_swin(fill, *backbone[1:])
        in_channels = [backbone[1] * 2**i for i in range(4)]
    else:
        sd = mmcv_resnet(fill, 50, deep_stem=True)
        in_channels = [256, 512, 1024, 2048]
    feats = in_channels if kind == "UPER" else in_channels[-1:]
    sd.update(mmseg_decode_head(fill, kind, feats, c))
    for s in range(3):
        sd.update(knet_update_head(fill, f"decode_head.kernel_update_head.{s}.", c=c))
    _conv_module(sd, fill, "auxiliary_head.convs.0", 256, in_channels[2], 3, "bn")
    sd["auxiliary_head.conv_seg.weight"] = fill(150, 256, 1, 1)
    sd["auxiliary_head.conv_seg.bias"] = fill(150)
    return sd


SWIN_L = ("swin", 192, (2, 2, 18, 2), (6, 12, 24, 48))
SWIN_T = ("swin", 96, (2, 2, 6, 2), (3, 6, 12, 24))

# (format, QuerySeg config, official state dict) for every released model (spec A6)
CASES = {
    "instance-R50-1x": ("instance", "knet_R50_1x_coco.yaml", lambda f: knet_det(f, 80, ("r", 50))),
    "instance-R101-DCN-ms3x": ("instance", "knet_R101_DCN_ms3x_coco.yaml",
                               lambda f: knet_det(f, 80, ("r", 101, True))),
    "panoptic-R50": ("panoptic", "knet_R50_ms3x_coco_panoptic.yaml",
                     lambda f: knet_det(f, 133, ("r", 50))),
    "panoptic-R101": ("panoptic", "knet_R101_ms3x_coco_panoptic.yaml",
                      lambda f: knet_det(f, 133, ("r", 101))),
    "panoptic-R101-DCN": ("panoptic", "knet_R101_DCN_ms3x_coco_panoptic.yaml",
                          lambda f: knet_det(f, 133, ("r", 101, True))),
    "panoptic-SwinL": ("panoptic", "knet_SwinL_ms3x_16x2_coco_panoptic.yaml",
                       lambda f: knet_det(f, 133, SWIN_L)),
    "semantic-FCN-R50-D8": ("semantic", "knet_fcn_R50-D8_80k_ade20k.yaml",
                            lambda f: knet_seg(f, "FCN", ("r",), 512)),
    "semantic-PSP-R50-D8": ("semantic", "knet_pspnet_R50-D8_80k_ade20k.yaml",
                            lambda f: knet_seg(f, "PSP", ("r",), 512)),
    "semantic-DeepLabV3-R50-D8": ("semantic", "knet_deeplabv3_R50-D8_80k_ade20k.yaml",
                                  lambda f: knet_seg(f, "ASPP", ("r",), 512)),
    "semantic-UPerNet-R50": ("semantic", "knet_upernet_R50_80k_ade20k.yaml",
                             lambda f: knet_seg(f, "UPER", ("r",), 512)),
    "semantic-UPerNet-SwinT": ("semantic", "knet_upernet_SwinT_80k_ade20k.yaml",
                               lambda f: knet_seg(f, "UPER", SWIN_T, 512)),
    "semantic-UPerNet-SwinL": ("semantic", "knet_upernet_SwinL_80k_ade20k.yaml",
                               lambda f: knet_seg(f, "UPER", SWIN_L, 512)),
}  # fmt: skip


def build(config: str, device: str = "meta"):
    """The QuerySeg model of ``config`` (meta: parameters without storage), in eval mode."""
    cfg = get_cfg()
    merge_config(cfg, os.path.join(CONFIGS, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    with torch.device(device):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Every key of every released layout maps onto the model, shapes agreeing
# --------------------------------------------------------------------------------------------


def _converted(case: str, fill: Fill, device: str = "meta"):
    """(official state of ``case``, the model of its config with the converted weights loaded
    strictly); fails listing every unmapped / missing / mis-shaped key."""
    fmt, config, make = CASES[case]
    official = make(fill)
    model = build(config, device=device)
    state, report = ck.convert_knet(official, fmt, model.state_dict().keys())
    check_against_model(state, model, report)
    assert report.ok, report.format()
    incompatible = model.load_state_dict(state, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return official, model


@pytest.mark.parametrize("case", list(CASES))
def test_every_official_key_maps_onto_the_model(case):
    _converted(case, Fill("meta"))


# --------------------------------------------------------------------------------------------
# The converted model computes what the official layout computes
# --------------------------------------------------------------------------------------------


def ref_mha(sd, p, x, num_heads):
    """mmcv ``MultiheadAttention`` (= torch's, packed q/k/v rows of ``in_proj``) with its
    identity shortcut; x [L, B, E]."""
    length, b, e = x.shape
    q, k, v = F.linear(x, sd[p + "in_proj_weight"], sd[p + "in_proj_bias"]).chunk(3, dim=-1)
    d = e // num_heads

    def heads(t):
        return t.reshape(length, b * num_heads, d).transpose(0, 1)

    att = (heads(q) @ heads(k).transpose(1, 2) / d**0.5).softmax(-1) @ heads(v)
    out = att.transpose(0, 1).reshape(length, b, e)
    return x + F.linear(out, sd[p + "out_proj.weight"], sd[p + "out_proj.bias"])


def ref_update_head(sd, p, x, kernels, masks, *, upd=256, hard=True, with_cls=True, heads=8):
    """The official ``KernelUpdateHead.forward`` (K = 1) on the official keys."""

    def lin(name, t, bias=True):
        return F.linear(t, sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] if bias else None)

    def ln(name, t):
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"])

    b, n, c = kernels.shape[:3]
    x = F.conv2d(x, sd[p + "feat_transform.conv.weight"], sd[p + "feat_transform.conv.bias"])
    if masks.shape[-2:] != x.shape[-2:]:
        masks = F.interpolate(masks, x.shape[-2:], mode="bilinear", align_corners=False)
    w = (masks.sigmoid() > 0.5).float() if hard else masks.softmax(dim=1)
    feats = torch.einsum("bnhw,bchw->bnc", w, x)
    prev = kernels.reshape(b, n, c, -1).permute(0, 1, 3, 2)
    # KernelUpdator: inputs viewed as (-1, in_channels) chunks
    u = "kernel_update_conv."
    f = feats.reshape(-1, upd)
    params = lin(u + "dynamic_layer", f)
    inputs = lin(u + "input_layer", prev.reshape(f.shape[0], -1, upd))
    gate = inputs[..., :upd] * params[:, :upd].unsqueeze(-2)
    input_gate = ln(u + "input_norm_in", lin(u + "input_gate", gate)).sigmoid()
    update_gate = ln(u + "norm_in", lin(u + "update_gate", gate)).sigmoid()
    new = update_gate * ln(u + "norm_out", params[:, -upd:]).unsqueeze(-2)
    new = new + input_gate * ln(u + "input_norm_out", inputs[..., -upd:])
    obj = F.relu(ln(u + "fc_norm", lin(u + "fc_layer", new)))
    obj = obj.reshape(b, n, -1).permute(1, 0, 2)
    obj = ln("attention_norm", ref_mha(sd, p + "attention.attn.", obj, heads))
    obj = obj.permute(1, 0, 2).reshape(b, n, -1, c)
    obj = ln("ffn_norm", obj + lin("ffn.layers.1", F.relu(lin("ffn.layers.0.0", obj))))
    cls = None
    if with_cls:
        cls_feat = F.relu(ln("cls_fcs.1", lin("cls_fcs.0", obj.sum(-2), bias=False)))
        cls = lin("fc_cls", cls_feat)
    mask_feat = lin("fc_mask", F.relu(ln("mask_fcs.1", lin("mask_fcs.0", obj, bias=False))))
    mask_kernels = mask_feat.permute(0, 1, 3, 2).reshape(b, n, c, 1, 1)
    new_masks = torch.cat([F.conv2d(x[i : i + 1], mask_kernels[i]) for i in range(b)])
    return cls, new_masks, obj.permute(0, 1, 3, 2).reshape(b, n, c, 1, 1)


@pytest.fixture(scope="module")
def instance_r50():
    """Random official R50 instance weights, converted and loaded into a CPU model."""
    return _converted("instance-R50-1x", Fill("cpu", seed=1), device="cpu")


@torch.no_grad()
def test_update_head_matches_the_official_computation(instance_r50):
    official, model = instance_r50
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 256, 12, 16, generator=g)
    kernels = torch.randn(2, 100, 256, 1, 1, generator=g)
    masks = torch.randn(2, 100, 6, 8, generator=g) * 3
    perm = ck.class_order("instance")
    for s, head in enumerate(model.kernel_update_heads):
        p = f"roi_head.mask_head.{s}."
        ref_cls, ref_masks, ref_kernels = ref_update_head(official, p, x, kernels, masks)
        cls, new_masks, new_kernels = head(x, kernels, masks)
        torch.testing.assert_close(cls, ref_cls[..., perm], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(new_masks, ref_masks, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(new_kernels, ref_kernels, rtol=1e-4, atol=1e-4)
        kernels, masks = new_kernels, new_masks


@torch.no_grad()
def test_attention_keeps_the_packed_qkv_layout(instance_r50):
    official, model = instance_r50
    head = model.kernel_update_heads[0]
    x = torch.randn(7, 2, 256, generator=torch.Generator().manual_seed(3))
    ours = head.attention_norm(x + head.attention(x, x, x, need_weights=False)[0])
    p = "roi_head.mask_head.0."
    ref = ref_mha(official, p + "attention.attn.", x, 8)
    ref = F.layer_norm(ref, (256,), official[p + "attention_norm.weight"],
                       official[p + "attention_norm.bias"])  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_conv_modules_and_initial_kernels(instance_r50):
    """mmcv ConvModule (conv + gn) -> Detectron2 Conv2d (+ norm); init_kernels and conv_seg."""
    official, model = instance_r50
    x = torch.randn(2, 256, 8, 8, generator=torch.Generator().manual_seed(4))
    for name, k in (("localization_fpn.convs_all_levels.2.conv1", 3), ("loc_convs.0", 1)):
        p = f"rpn_head.{name}."
        ref = F.conv2d(x, official[p + "conv.weight"], padding=k // 2)
        ref = F.relu(F.group_norm(ref, 32, official[p + "gn.weight"], official[p + "gn.bias"]))
        ours = model.kernel_head.get_submodule(name)(x)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    head = model.kernel_head
    torch.testing.assert_close(
        head.init_kernels(x), F.conv2d(x, official["rpn_head.init_kernels.weight"])
    )
    perm = ck.class_order("instance")
    ref_seg = F.conv2d(x, official["rpn_head.conv_seg.weight"], official["rpn_head.conv_seg.bias"])
    torch.testing.assert_close(head.conv_seg(x), ref_seg[:, perm])


def _conv_bn_relu(sd, p, x, padding=1):
    y = F.conv2d(x, sd[p + ".conv.weight"], padding=padding)
    y = F.batch_norm(y, sd[p + ".bn.running_mean"], sd[p + ".bn.running_var"],
                     sd[p + ".bn.weight"], sd[p + ".bn.bias"], False, 0.0, 1e-5)  # fmt: skip
    return F.relu(y)


@torch.no_grad()
def test_semantic_fcn_model_matches_the_official_computation():
    """FCN decode head (BN conv modules), conv_seg as the initial class kernels, and three update
    heads whose 512-d kernels go through the 256-d updator in two chunks, as mmseg computes."""
    official, model = _converted("semantic-FCN-R50-D8", Fill("cpu", seed=5), device="cpu")

    x = torch.randn(1, 2048, 6, 6, generator=torch.Generator().manual_seed(6))
    g = "decode_head.kernel_generate_head."
    feats = _conv_bn_relu(official, g + "convs.1", _conv_bn_relu(official, g + "convs.0", x))
    feats = _conv_bn_relu(official, g + "conv_cat", torch.cat([x, feats], dim=1))
    logits = F.conv2d(feats, official[g + "conv_seg.weight"], official[g + "conv_seg.bias"])
    kernels = official[g + "conv_seg.weight"][None]
    ref = [logits]
    for s in range(3):
        p = f"decode_head.kernel_update_head.{s}."
        _, logits, kernels = ref_update_head(
            official, p, feats, kernels, logits, hard=False, with_cls=False
        )
        ref.append(logits)
    ours = model.forward_stages([x])
    assert len(ours) == 4
    for a, b in zip(ours, ref):  # random weights: logits reach ~1e4, compare relative to that
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@torch.no_grad()
def test_swin_patch_merging_channel_order():
    """mmcv PatchMerging (nn.Unfold, channels (c, dy, dx)) == timm's after the reorder."""
    from timm.models.swin_transformer import PatchMerging

    c = 8
    official = mmcv_swin(Fill("cpu", seed=7), c, (1, 1), (1, 1))
    state, report = convert_state_dict(
        official, swin_rules("backbone.", "backbone.", layout="mmcv")
    )
    assert not report.unmapped
    merge = PatchMerging(c).eval()
    merge.load_state_dict({k.removeprefix("backbone.layers.1.downsample."): v
                           for k, v in state.items() if ".downsample." in k})  # fmt: skip
    x = torch.randn(2, 6, 10, c, generator=torch.Generator().manual_seed(8))  # B, H, W, C
    unfolded = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    p = "backbone.stages.0.downsample."
    ref = F.layer_norm(unfolded, (4 * c,), official[p + "norm.weight"], official[p + "norm.bias"])
    ref = F.linear(ref, official[p + "reduction.weight"]).reshape(2, 3, 5, 2 * c)
    torch.testing.assert_close(merge(x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Class order: mmdet -> Detectron2 by name
# --------------------------------------------------------------------------------------------


def test_released_class_orders_coincide_by_name():
    for fmt, n in (("instance", 80), ("panoptic", 133)):
        src, dst = ck.mmdet_class_names(fmt), ck.detectron2_class_names(fmt)
        perm = ck.class_order(fmt)
        assert len(perm) == n and [src[i] for i in perm] == dst
        assert perm == list(range(n))  # they coincide today; the converter does not assume it
    assert ck.class_order("semantic") is None


@torch.no_grad()
def test_class_rows_follow_the_names(monkeypatch):
    """With a shuffled mmdet class list, fc_cls / conv_seg rows move to Detectron2's order: the
    converted classifier's logit for class NAME equals the official logit for NAME."""
    shuffled = list(ck.MMDET_COCO_CLASSES)
    g = torch.Generator().manual_seed(9)
    shuffled = [shuffled[i] for i in torch.randperm(80, generator=g).tolist()]
    stuff = list(reversed(ck.MMDET_COCO_PANOPTIC_STUFF))
    monkeypatch.setattr(ck, "MMDET_COCO_CLASSES", tuple(shuffled))
    monkeypatch.setattr(ck, "MMDET_COCO_PANOPTIC_STUFF", tuple(stuff))
    for fmt, n in (("instance", 80), ("panoptic", 133)):
        fill = Fill("cpu", seed=10)
        official = knet_update_head(fill, "h.", num_classes=n)
        official["rpn_head.conv_seg.weight"] = fill(n, 256, 1, 1)
        official["rpn_head.conv_seg.bias"] = fill(n)
        rows = permute_rows(ck.class_order(fmt))
        rules = [*ck.update_head_rules("h.", "", rows)]
        rules += [r for r in ck.det_rules(fmt, {}) if "conv_seg" in r.pattern]
        state, report = convert_state_dict(official, rules)
        assert not report.unmapped
        src, dst = ck.mmdet_class_names(fmt), ck.detectron2_class_names(fmt)
        assert src != dst
        feat = torch.randn(5, 256, generator=g)
        ours = F.linear(feat, state["fc_cls.weight"], state["fc_cls.bias"])
        ref = F.linear(feat, official["h.fc_cls.weight"], official["h.fc_cls.bias"])
        seg = F.conv2d(feat[..., None, None], state["kernel_head.conv_seg.weight"])
        ref_seg = F.conv2d(feat[..., None, None], official["rpn_head.conv_seg.weight"])
        for j, name in enumerate(dst):
            torch.testing.assert_close(ours[:, j], ref[:, src.index(name)])
            torch.testing.assert_close(seg[:, j], ref_seg[:, src.index(name)])


def test_panoptic_order_must_keep_things_first(monkeypatch):
    stuff = list(ck.MMDET_COCO_PANOPTIC_STUFF)
    things = list(ck.MMDET_COCO_CLASSES)
    things[0], stuff[0] = stuff[0], things[0]  # "person" listed as stuff by mmdet
    monkeypatch.setattr(ck, "MMDET_COCO_CLASSES", tuple(things))
    monkeypatch.setattr(ck, "MMDET_COCO_PANOPTIC_STUFF", tuple(stuff))
    with pytest.raises(CheckpointError, match="things first"):
        ck.class_order("panoptic")


# --------------------------------------------------------------------------------------------
# Refusals and the command line
# --------------------------------------------------------------------------------------------


def test_wrong_format_is_refused_with_a_hint():
    official = knet_det(Fill("meta"), 133, ("r", 50))
    with pytest.raises(CheckpointError, match=r"133 class rows.*--format panoptic"):
        ck.convert_knet(official, "instance")
    with pytest.raises(CheckpointError, match=r"no decode_head.*--format instance/panoptic"):
        ck.convert_knet(official, "semantic")


def _save_official(path, state):
    meta = {"epoch": 12, "CLASSES": list(ck.MMDET_COCO_CLASSES)}
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, path)


def test_cli_converts_and_the_result_loads_strictly(tmp_path):
    official = CASES["instance-R50-1x"][2](Fill("cpu", seed=11))
    src, dst = str(tmp_path / "knet_official.pth"), str(tmp_path / "knet_qs.pth")
    _save_official(src, official)
    assert ck.main([src, dst, "--format", "instance"]) == 0  # default config of the format
    model = build("knet_R50_1x_coco.yaml", device="cpu")
    QSCheckpointer(model).load(dst)  # strict: raises on missing / unexpected / shapes
    torch.testing.assert_close(
        model.kernel_update_heads[2].attention.in_proj_weight,
        official["roi_head.mask_head.2.attention.attn.in_proj_weight"],
    )
    assert torch.load(dst, weights_only=True)["meta_architecture"] == "KNet"


def test_cli_refuses_unmapped_keys_and_wrong_shapes(tmp_path, capsys):
    official = CASES["instance-R50-1x"][2](Fill("cpu", seed=12))
    official["rpn_head.extra_conv.weight"] = torch.zeros(3)
    official["roi_head.mask_head.1.fc_mask.weight"] = torch.zeros(256, 128)
    src, dst = str(tmp_path / "bad.pth"), str(tmp_path / "bad_qs.pth")
    _save_official(src, official)
    config = os.path.join(CONFIGS, "knet_R50_1x_coco.yaml")
    assert ck.main([src, dst, "--format", "instance", "--config-file", config]) == 1
    err = capsys.readouterr().err
    assert "rpn_head.extra_conv.weight" in err
    assert "kernel_update_heads.1.fc_mask.weight: (256, 128) vs (256, 256)" in err
    assert not os.path.exists(dst)
