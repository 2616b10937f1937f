"""tools/convert_queryinst.py: official QueryInst checkpoints (spec B7 key names and shapes,
generated here from the spec and torchvision's ResNet, not from our model) convert into
QuerySeg's QueryInst with no missing/unexpected keys, for every COCO config at full size (on the
meta device) and for a reduced model with real tensors; one DIIHead and one mask head computed in
the official layout equal ours after conversion; the CLI writes a checkpoint QSCheckpointer loads;
an unmapped key or a wrong shape writes nothing and is listed."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY

from common.convert.core import CheckpointError, check_against_model
from common.convert.rules import MMDET_COCO_CLASSES
from common.engine import get_cfg, merge_config
from common.engine.checkpoint import QSCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import convert_queryinst  # noqa: E402

CONFIGS = os.path.join(REPO, "projects/queryinst/configs")
R50_1X = os.path.join(CONFIGS, "queryinst_R50_FPN_1x_coco.yaml")
SWIN_L = os.path.join(CONFIGS, "queryinst_swin_L_FPN_300q_crop_ms_400-1200_50e_coco.yaml")
#: reduced heads (2 stages, 10 queries, dynamic width 16, FFN 128) on the real R50-FPN
SMALL = {"num_stages": 2, "num_proposals": 10, "feat": 16, "ffn": 128}
SMALL_OPTS = ["MODEL.QUERYINST.NUM_STAGES", "2", "MODEL.QUERYINST.NUM_PROPOSALS", "10",
              "MODEL.QUERYINST.DIM_DYNAMIC", "16", "MODEL.QUERYINST.DIM_FEEDFORWARD", "128",
              "TEST.DETECTIONS_PER_IMAGE", "10"]  # fmt: skip


# ---- the official layout, from spec B7 --------------------------------------------------------


def official_head_shapes(
    num_stages: int = 6, num_proposals: int = 100, c: int = 256, feat: int = 64,
    ffn: int = 2048, k: int = 80, box_roi: int = 7, mask_convs: int = 4,
) -> dict[str, tuple]:  # fmt: skip
    """neck + rpn_head + roi_head keys and shapes of an official QueryInst checkpoint."""
    shapes: dict[str, tuple] = {}
    for i, cin in enumerate((256, 512, 1024, 2048)):
        shapes |= {f"neck.lateral_convs.{i}.conv.weight": (c, cin, 1, 1),
                   f"neck.lateral_convs.{i}.conv.bias": (c,),
                   f"neck.fpn_convs.{i}.conv.weight": (c, c, 3, 3),
                   f"neck.fpn_convs.{i}.conv.bias": (c,)}  # fmt: skip
    shapes["rpn_head.init_proposal_bboxes.weight"] = (num_proposals, 4)
    shapes["rpn_head.init_proposal_features.weight"] = (num_proposals, c)

    def ln(prefix, n):
        return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}

    def dynamic(prefix, proj):
        out = {f"{prefix}.dynamic_layer.weight": (2 * c * feat, c),
               f"{prefix}.dynamic_layer.bias": (2 * c * feat,),
               **ln(f"{prefix}.norm_in", feat), **ln(f"{prefix}.norm_out", c)}  # fmt: skip
        if proj:
            out |= {f"{prefix}.fc_layer.weight": (c, c * box_roi**2),
                    f"{prefix}.fc_layer.bias": (c,), **ln(f"{prefix}.fc_norm", c)}  # fmt: skip
        return out

    for t in range(num_stages):
        b = f"roi_head.bbox_head.{t}"
        shapes |= {f"{b}.attention.attn.in_proj_weight": (3 * c, c),
                   f"{b}.attention.attn.in_proj_bias": (3 * c,),
                   f"{b}.attention.attn.out_proj.weight": (c, c),
                   f"{b}.attention.attn.out_proj.bias": (c,), **ln(f"{b}.attention_norm", c),
                   **dynamic(f"{b}.instance_interactive_conv", True),
                   **ln(f"{b}.instance_interactive_conv_norm", c),
                   f"{b}.ffn.layers.0.0.weight": (ffn, c), f"{b}.ffn.layers.0.0.bias": (ffn,),
                   f"{b}.ffn.layers.1.weight": (c, ffn), f"{b}.ffn.layers.1.bias": (c,),
                   **ln(f"{b}.ffn_norm", c),
                   f"{b}.cls_fcs.0.weight": (c, c), **ln(f"{b}.cls_fcs.1", c),
                   f"{b}.fc_cls.weight": (k, c), f"{b}.fc_cls.bias": (k,),
                   f"{b}.fc_reg.weight": (4, c), f"{b}.fc_reg.bias": (4,)}  # fmt: skip
        for j in range(3):
            shapes |= {f"{b}.reg_fcs.{3 * j}.weight": (c, c), **ln(f"{b}.reg_fcs.{3 * j + 1}", c)}
        m = f"roi_head.mask_head.{t}"
        shapes |= dynamic(f"{m}.instance_interactive_conv", False)
        for j in range(mask_convs):
            shapes[f"{m}.convs.{j}.conv.weight"] = (c, c, 3, 3)
            shapes |= {f"{m}.convs.{j}.bn.{n}": (c,)
                       for n in ("weight", "bias", "running_mean", "running_var")}  # fmt: skip
            shapes[f"{m}.convs.{j}.bn.num_batches_tracked"] = ()
        shapes |= {
            f"{m}.upsample.weight": (c, c, 2, 2),
            f"{m}.upsample.bias": (c,),
            f"{m}.conv_logits.weight": (k, c, 1, 1),
            f"{m}.conv_logits.bias": (k,),
        }
    return shapes


def official_swin_shapes(embed: int, depths, heads, window: int) -> dict[str, tuple]:
    """Swin-official detection backbone keys (``backbone.``), with its position-index buffers."""
    shapes = {"backbone.patch_embed.proj.weight": (embed, 3, 4, 4),
              "backbone.patch_embed.proj.bias": (embed,),
              "backbone.patch_embed.norm.weight": (embed,),
              "backbone.patch_embed.norm.bias": (embed,)}  # fmt: skip
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        for j in range(depth):
            p = f"backbone.layers.{i}.blocks.{j}"
            shapes |= {f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,),
                       f"{p}.attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                       f"{p}.attn.relative_position_index": (window**2, window**2),
                       f"{p}.attn.qkv.weight": (3 * c, c), f"{p}.attn.qkv.bias": (3 * c,),
                       f"{p}.attn.proj.weight": (c, c), f"{p}.attn.proj.bias": (c,),
                       f"{p}.norm2.weight": (c,), f"{p}.norm2.bias": (c,),
                       f"{p}.mlp.fc1.weight": (4 * c, c), f"{p}.mlp.fc1.bias": (4 * c,),
                       f"{p}.mlp.fc2.weight": (c, 4 * c), f"{p}.mlp.fc2.bias": (c,)}  # fmt: skip
        if i < len(depths) - 1:
            p = f"backbone.layers.{i}.downsample"
            shapes |= {f"{p}.reduction.weight": (2 * c, 4 * c), f"{p}.norm.weight": (4 * c,),
                       f"{p}.norm.bias": (4 * c,)}  # fmt: skip
        shapes |= {f"backbone.norm{i}.weight": (c,), f"backbone.norm{i}.bias": (c,)}
    return shapes


def mmdet_resnet_shapes(depth: int) -> dict[str, tuple]:
    """mmdet ResNet = torchvision's names and shapes (no ``fc``), under ``backbone.``."""
    import torchvision

    with torch.device("meta"):
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    return {f"backbone.{k}": tuple(v.shape) for k, v in net.state_dict().items()
            if not k.startswith("fc.")}  # fmt: skip


def materialise(shapes: dict[str, tuple], device: str = "cpu", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if device == "meta":
            dtype = torch.int64 if k.endswith(("num_batches_tracked", "index")) else torch.float32
            out[k] = torch.empty(s, device="meta", dtype=dtype)
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000)
        elif k.endswith("relative_position_index"):
            out[k] = torch.randint(0, 10, s)
        elif k.endswith("running_var"):
            out[k] = torch.rand(s, generator=g) + 0.5
        else:
            out[k] = torch.randn(s, generator=g) * (0.1 if len(s) > 1 else 0.5)
    return out


def meta_model(config: str, opts=()):
    cfg = get_cfg()
    merge_config(cfg, config, [*opts, "MODEL.DEVICE", "cpu"])
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


# ---- every config at full size (shapes only) --------------------------------------------------

FULL = {
    "queryinst_R50_FPN_1x_coco.yaml": (50, 100),
    "queryinst_R50_FPN_ms_3x_coco.yaml": (50, 100),
    "queryinst_R50_FPN_300q_crop_ms_3x_coco.yaml": (50, 300),
    "queryinst_R101_FPN_ms_3x_coco.yaml": (101, 100),
    "queryinst_R101_FPN_300q_crop_ms_3x_coco.yaml": (101, 300),
    "queryinst_swin_L_FPN_300q_crop_ms_400-1200_50e_coco.yaml": ("swin_L", 300),
}


@pytest.mark.parametrize("config", sorted(FULL))
def test_every_config_converts_at_full_size(config):
    backbone, queries = FULL[config]
    if backbone == "swin_L":
        shapes = official_swin_shapes(192, (2, 2, 18, 2), (6, 12, 24, 48), 7)
        shapes |= official_head_shapes(num_proposals=queries)
        for i, cin in enumerate((192, 384, 768, 1536)):
            shapes[f"neck.lateral_convs.{i}.conv.weight"] = (256, cin, 1, 1)
    else:
        shapes = mmdet_resnet_shapes(backbone) | official_head_shapes(num_proposals=queries)
    model = meta_model(os.path.join(CONFIGS, config))
    target = model.state_dict()
    converted, report = convert_queryinst.convert_queryinst(materialise(shapes, "meta"), target)
    check_against_model(converted, target, report)
    assert report.ok, report.format()


def test_a_300_query_checkpoint_is_refused_by_a_100_query_config():
    shapes = mmdet_resnet_shapes(50) | official_head_shapes(num_proposals=300)
    target = meta_model(R50_1X).state_dict()
    converted, report = convert_queryinst.convert_queryinst(materialise(shapes, "meta"), target)
    check_against_model(converted, target, report)
    assert [k for k, _, _ in report.shapes] == [
        "rpn_head.init_proposal_bboxes.weight",
        "rpn_head.init_proposal_features.weight",
    ]


# ---- a reduced model with real tensors --------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    """(official state, QuerySeg model) for R50-FPN with reduced heads, built once."""
    cfg = get_cfg()
    merge_config(cfg, R50_1X, [*SMALL_OPTS, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = META_ARCH_REGISTRY.get("QueryInst")(cfg).eval()
    official = materialise(mmdet_resnet_shapes(50) | official_head_shapes(**SMALL))
    return official, model


def test_reduced_model_loads_strictly(small):
    official, model = small
    converted, report = convert_queryinst.convert_queryinst(official, model.state_dict())
    check_against_model(converted, model, report)
    assert report.ok, report.format()
    assert len(official) - len(converted) == 53  # the FrozenBN backbone's batch counters
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(
        model.backbone.bottom_up.res3[0].shortcut.norm.running_var,
        official["backbone.layer2.0.downsample.1.running_var"],
    )
    torch.testing.assert_close(
        model.backbone.fpn_output5.weight, official["neck.fpn_convs.3.conv.weight"]
    )


def _official_dynamic_conv(w: dict, p: str, query, roi, proj: bool):
    """mmdet DynamicConv with official keys: [P, C] queries, [P, C, r, r] RoIs."""
    c, feat = w[f"{p}.norm_out.weight"].numel(), w[f"{p}.norm_in.weight"].numel()
    params = F.linear(query, w[f"{p}.dynamic_layer.weight"], w[f"{p}.dynamic_layer.bias"])
    param_in = params[:, : c * feat].view(-1, c, feat)
    param_out = params[:, c * feat :].view(-1, feat, c)
    x = roi.flatten(2).permute(2, 0, 1).permute(1, 0, 2)  # [P, r*r, C] as mmdet does it
    x = F.relu(F.layer_norm(torch.bmm(x, param_in), (feat,), w[f"{p}.norm_in.weight"],
                            w[f"{p}.norm_in.bias"]))  # fmt: skip
    x = F.relu(F.layer_norm(torch.bmm(x, param_out), (c,), w[f"{p}.norm_out.weight"],
                            w[f"{p}.norm_out.bias"]))  # fmt: skip
    if not proj:
        return x
    x = F.linear(x.flatten(1), w[f"{p}.fc_layer.weight"], w[f"{p}.fc_layer.bias"])
    return F.relu(F.layer_norm(x, (c,), w[f"{p}.fc_norm.weight"], w[f"{p}.fc_norm.bias"]))


def _ln(w, p, x):
    return F.layer_norm(x, x.shape[-1:], w[f"{p}.weight"], w[f"{p}.bias"])


def official_dii_head(w: dict, p: str, roi, queries, num_heads: int = 8):
    """The official DIIHead forward (mmcv MHA on [N, B, C]), from official keys only."""
    b, n, c = queries.shape
    x = queries.permute(1, 0, 2)
    a = F.multi_head_attention_forward(
        x, x, x, c, num_heads, w[f"{p}.attention.attn.in_proj_weight"],
        w[f"{p}.attention.attn.in_proj_bias"], None, None, False, 0.0,
        w[f"{p}.attention.attn.out_proj.weight"], w[f"{p}.attention.attn.out_proj.bias"],
        training=False, need_weights=False)[0]  # fmt: skip
    attn = _ln(w, f"{p}.attention_norm", x + a).permute(1, 0, 2)
    q = attn.reshape(-1, c)
    obj = q + _official_dynamic_conv(w, f"{p}.instance_interactive_conv", q, roi, True)
    obj = _ln(w, f"{p}.instance_interactive_conv_norm", obj)
    hidden = F.relu(F.linear(obj, w[f"{p}.ffn.layers.0.0.weight"], w[f"{p}.ffn.layers.0.0.bias"]))
    obj = _ln(w, f"{p}.ffn_norm", obj + F.linear(hidden, w[f"{p}.ffn.layers.1.weight"],
                                                 w[f"{p}.ffn.layers.1.bias"]))  # fmt: skip
    cls = F.relu(_ln(w, f"{p}.cls_fcs.1", F.linear(obj, w[f"{p}.cls_fcs.0.weight"])))
    reg = obj
    for j in range(3):
        reg = F.relu(
            _ln(w, f"{p}.reg_fcs.{3 * j + 1}", F.linear(reg, w[f"{p}.reg_fcs.{3 * j}.weight"]))
        )
    return (F.linear(cls, w[f"{p}.fc_cls.weight"], w[f"{p}.fc_cls.bias"]).view(b, n, -1),
            F.linear(reg, w[f"{p}.fc_reg.weight"], w[f"{p}.fc_reg.bias"]).view(b, n, 4),
            obj.view(b, n, c), attn)  # fmt: skip


def official_mask_head(w: dict, p: str, roi, attn_feats, num_convs: int = 4):
    """The official DynamicMaskHead forward (BN in eval mode), from official keys only."""
    x = _official_dynamic_conv(w, f"{p}.instance_interactive_conv", attn_feats, roi, False)
    x = x.permute(0, 2, 1).reshape(roi.shape)
    for j in range(num_convs):
        bn = f"{p}.convs.{j}.bn"
        x = F.conv2d(x, w[f"{p}.convs.{j}.conv.weight"], padding=1)
        x = F.relu(F.batch_norm(x, w[f"{bn}.running_mean"], w[f"{bn}.running_var"],
                                w[f"{bn}.weight"], w[f"{bn}.bias"], False))  # fmt: skip
    x = F.relu(F.conv_transpose2d(x, w[f"{p}.upsample.weight"], w[f"{p}.upsample.bias"], 2))
    return F.conv2d(x, w[f"{p}.conv_logits.weight"], w[f"{p}.conv_logits.bias"])


def test_heads_compute_the_official_function_with_class_rows_reordered(small):
    """Stage 1's DIIHead and mask head, official layout vs ours after conversion. The source
    class order is shuffled so that the by-name row permutation is exercised."""
    official, model = small
    src_classes = list(MMDET_COCO_CLASSES)
    random.Random(0).shuffle(src_classes)
    dst_classes = convert_queryinst.coco_thing_classes()
    converted, report = convert_queryinst.convert_queryinst(
        official, model.state_dict(), src_classes=src_classes
    )
    assert report.ok
    model.load_state_dict(converted)
    perm = [src_classes.index(name) for name in dst_classes]
    assert perm != list(range(80))
    g = torch.Generator().manual_seed(1)
    b, n, c = 2, SMALL["num_proposals"], 256
    queries = torch.randn(b, n, c, generator=g)
    roi7 = torch.randn(b * n, c, 7, 7, generator=g)
    roi14 = torch.randn(5, c, 14, 14, generator=g)
    with torch.no_grad():
        cls, deltas, obj, attn = official_dii_head(official, "roi_head.bbox_head.1", roi7, queries)
        ours = model.roi_head.bbox_head[1](roi7, queries)
        masks = official_mask_head(official, "roi_head.mask_head.1", roi14, attn.flatten(0, 1)[:5])
        our_masks = model.roi_head.mask_head[1](roi14, ours["attn_features"].flatten(0, 1)[:5])
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(ours["attn_features"], attn, **tol)
    torch.testing.assert_close(ours["object_features"], obj, **tol)
    torch.testing.assert_close(ours["box_deltas"], deltas, **tol)
    torch.testing.assert_close(ours["cls_logits"], cls[..., perm], **tol)
    torch.testing.assert_close(our_masks, masks[:, perm], **tol)


def test_cli_writes_a_checkpoint_the_strict_checkpointer_loads(small, tmp_path):
    official, model = small
    src = tmp_path / "queryinst_r50_fpn_1x_coco_20210907_084916-5a8f1998.pth"
    torch.save({"meta": {"mmdet_version": "2.16.0"}, "state_dict": official}, src)
    dst = tmp_path / "queryinst_R50_FPN_1x_coco.pth"
    assert convert_queryinst.main([str(src), str(dst), "--config-file", R50_1X, *SMALL_OPTS]) == 0
    QSCheckpointer(model).load(str(dst))
    torch.testing.assert_close(
        model.roi_head.mask_head[0].convs[2].bn.running_mean,
        official["roi_head.mask_head.0.convs.2.bn.running_mean"],
    )
    assert torch.load(dst, weights_only=True)["meta_architecture"] == "QueryInst"


def test_cli_refuses_an_unmapped_key_and_a_wrong_shape(small, tmp_path, capsys):
    official, _ = small
    bad = dict(official)
    bad["roi_head.bbox_head.0.extra_fc.weight"] = torch.zeros(3)
    bad["roi_head.bbox_head.1.fc_reg.weight"] = torch.zeros(5, 256)
    del bad["roi_head.mask_head.1.upsample.bias"]
    src, dst = tmp_path / "bad.pth", tmp_path / "out.pth"
    torch.save({"state_dict": bad}, src)
    assert convert_queryinst.main([str(src), str(dst), "--config-file", R50_1X, *SMALL_OPTS]) == 1
    err = capsys.readouterr().err
    assert not dst.exists()
    for listed in ("source keys no rule maps (1)", "roi_head.bbox_head.0.extra_fc.weight",
                   "roi_head.mask_head.1.upsample.bias",
                   "roi_head.bbox_head.1.fc_reg.weight: (5, 256) vs (4, 256)"):  # fmt: skip
        assert listed in err


def test_other_layouts_are_refused_by_name():
    with pytest.raises(CheckpointError, match="not a QueryInst checkpoint"):
        convert_queryinst.convert_queryinst({"model.conv.weight": torch.zeros(1)})
    mmcv_swin = {"backbone.stages.0.blocks.0.attn.w_msa.qkv.weight": torch.zeros(1),
                 "backbone.layers.0.x": torch.zeros(1)}  # fmt: skip
    with pytest.raises(CheckpointError, match="mmcv Swin names"):
        convert_queryinst.convert_queryinst(mmcv_swin)
    with pytest.raises(CheckpointError, match="class lists differ"):
        convert_queryinst.queryinst_rules("resnet", src_classes=MMDET_COCO_CLASSES[:79])


def test_swin_official_backbone_rules():
    """Swin-official detection keys: downsample moves one stage up, index buffers go."""
    shapes = official_swin_shapes(8, (2, 2), (1, 2), 7)
    converted, report = convert_queryinst.convert_queryinst(materialise(shapes))
    assert report.ok
    assert "backbone.bottom_up.layers.1.downsample.reduction.weight" in converted
    assert not any("relative_position_index" in k or "layers.0.downsample" in k
                   for k in converted)  # fmt: skip
    assert math.prod(converted["backbone.bottom_up.norm1.weight"].shape) == 16
