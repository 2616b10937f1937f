"""QueryInst building blocks against hand-computed values: dynamic convolution (split order and
flatten order of the official checkpoints), box decoding, learned proposals, RoI mask targets,
the parameter layout of the official checkpoints and the inference selection."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from queryinst.dii_head import DIIHead
from queryinst.dynamic_conv import DynamicConv
from queryinst.loss import roi_mask_targets
from queryinst.mask_head import DynamicMaskHead
from queryinst.roi_head import EmbeddingRPNHead, QueryRoIHead

from common.engine import get_cfg


def _ln2(a: float, b: float) -> list[float]:
    """LayerNorm (weight 1, bias 0, eps 1e-5) of the 2-vector (a, b)."""
    d = (a - b) / 2
    s = math.sqrt(d * d + 1e-5)
    return [d / s, -d / s]


def test_dynamic_conv_hand_computed_split_order():
    """C = F = 2, one position; dynamic_layer = bias only, so the kernels are known:
    param_in = first C*F outputs viewed (C, F) = [[1, 2], [0, -1]],
    param_out = last F*C outputs viewed (F, C) = [[0, 1], [1, 0]]."""
    conv = DynamicConv(2, 2, 2, input_feat_shape=1, with_proj=False)
    with torch.no_grad():
        conv.dynamic_layer.weight.zero_()
        conv.dynamic_layer.bias.copy_(torch.tensor([1.0, 2, 0, -1, 0, 1, 1, 0]))
    x = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)  # one RoI, one position, feature (3, 1)
    out = conv(torch.zeros(1, 2), x)
    # (3, 1) @ [[1, 2], [0, -1]] = (3, 5) -> LN -> (-1, 1) -> ReLU -> (0, 1)
    h = [max(v, 0.0) for v in _ln2(3.0, 5.0)]
    # (0, 1) @ [[0, 1], [1, 0]] = (1, 0) -> LN -> (1, -1) -> ReLU -> (1, 0)
    y = [h[0] * 0 + h[1] * 1, h[0] * 1 + h[1] * 0]
    expected = [max(v, 0.0) for v in _ln2(*y)]
    assert out.shape == (1, 1, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert expected[0] > 0.99 and expected[1] == 0.0  # a swapped split would give (0, 1)


def test_dynamic_conv_matches_per_query_reference():
    """Random sizes, with projection: per-query loop of the spec's formula (position-major flatten
    into fc_layer)."""
    torch.manual_seed(0)
    c, f, r, p = 6, 3, 2, 4
    conv = DynamicConv(c, f, c, input_feat_shape=r, with_proj=True)
    q = torch.randn(p, c)
    roi = torch.randn(p, c, r, r)
    out = conv(q, roi)
    ln_f = torch.nn.functional.layer_norm
    for i in range(p):
        params = conv.dynamic_layer(q[i])
        p_in = params[: c * f].view(c, f)
        p_out = params[c * f :].view(f, c)
        feats = roi[i].reshape(c, r * r).T  # [S, C], S = positions row-major
        h = torch.relu(ln_f(feats @ p_in, (f,), conv.norm_in.weight, conv.norm_in.bias))
        h = torch.relu(ln_f(h @ p_out, (c,), conv.norm_out.weight, conv.norm_out.bias))
        flat = h.reshape(-1)  # index = s * C + c
        ref = torch.relu(conv.fc_norm(conv.fc_layer(flat)))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_box_decoding_hand_computed():
    """mmdet DeltaXYWHBBoxCoder (stds .5, .5, 1, 1) == Box2BoxTransform(2, 2, 1, 1)."""
    transform = Box2BoxTransform(weights=(2.0, 2.0, 1.0, 1.0))
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), size 20 x 40
    deltas = torch.tensor([[0.5, -0.5, math.log(2.0), 0.0]])
    # cx = 20 + 0.5*0.5*20 = 25, cy = 40 - 0.5*0.5*40 = 30, w = 40, h = 40
    torch.testing.assert_close(
        transform.apply_deltas(deltas, box), torch.tensor([[5.0, 10.0, 45.0, 50.0]])
    )


def _tiny_roi_head(num_stages: int = 2, num_classes: int = 3, dim: int = 16) -> QueryRoIHead:
    cfg = get_cfg()
    q = cfg.MODEL.QUERYINST
    cfg.MODEL.NUM_CLASSES = num_classes
    q.NUM_STAGES, q.NUM_HEADS = num_stages, 2
    q.DIM_DYNAMIC, q.DIM_FEEDFORWARD, q.MASK_CONV_DIM, q.MASK_NUM_CONVS = 4, 32, 8, 1
    q.MASK_NORM = "GN"
    shapes = {f"p{i}": ShapeSpec(channels=dim, stride=2**i) for i in range(2, 6)}
    return QueryRoIHead(cfg, shapes)


def test_box_stage_decodes_deltas_against_input_boxes():
    """Stage output boxes = Box2BoxTransform(fc_reg output) applied to the stage's input boxes."""
    torch.manual_seed(0)
    head = _tiny_roi_head()
    reg = head.bbox_head[0].fc_reg
    with torch.no_grad():
        reg.weight.zero_()
        reg.bias.copy_(torch.tensor([0.5, -0.5, math.log(2.0), 0.0]))
    feats = [torch.randn(1, 16, 64 // 2**i, 64 // 2**i) for i in range(2, 6)]
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 64.0, 64.0]]])
    out = head.box_stage(0, feats, boxes, torch.randn(1, 2, 16))
    expected = torch.tensor([[[5.0, 10.0, 45.0, 50.0], [-16.0, -16.0, 112.0, 48.0]]])
    torch.testing.assert_close(out["pred_boxes"], expected)
    assert out["pred_logits"].shape == (1, 2, 3)
    assert out["attn_features"].shape == out["object_features"].shape == (1, 2, 16)


def test_initial_proposals_cover_each_unpadded_image():
    rpn = EmbeddingRPNHead(3, 8)
    boxes, feats = rpn(torch.tensor([[40.0, 30.0, 40.0, 30.0], [20.0, 50.0, 20.0, 50.0]]))
    assert boxes.shape == (2, 3, 4) and feats.shape == (2, 3, 8)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.0, 0.0, 40.0, 30.0]))
    torch.testing.assert_close(boxes[1, 2], torch.tensor([0.0, 0.0, 20.0, 50.0]))


def test_roi_mask_targets_crop_to_the_predicted_box():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 8:24, 4:12] = True  # left half of the box below is foreground
    masks[1, :, :] = True
    pred_boxes = torch.tensor([[[4.0, 8.0, 20.0, 24.0], [0.0, 0.0, 32.0, 32.0]]])
    targets = [{"masks": masks}]
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    t = roi_mask_targets(targets, indices, pred_boxes, 28)
    assert t.shape == (2, 28, 28) and t.dtype == torch.float32
    assert t[0, :, :14].min() == 1 and t[0, :, 14:].max() == 0
    assert t[1].min() == 1


def _official_keys(prefix: str, k: int, c: int = 256, f: int = 64, ffn: int = 2048) -> dict:
    """Official (mmdet) checkpoint keys and shapes of one stage (spec B7)."""
    n = 2 * c * f
    box = {
        "attention.attn.in_proj_weight": (3 * c, c), "attention.attn.in_proj_bias": (3 * c,),
        "attention.attn.out_proj.weight": (c, c), "attention.attn.out_proj.bias": (c,),
        "attention_norm.weight": (c,), "attention_norm.bias": (c,),
        "instance_interactive_conv.dynamic_layer.weight": (n, c),
        "instance_interactive_conv.dynamic_layer.bias": (n,),
        "instance_interactive_conv.norm_in.weight": (f,),
        "instance_interactive_conv.norm_in.bias": (f,),
        "instance_interactive_conv.norm_out.weight": (c,),
        "instance_interactive_conv.norm_out.bias": (c,),
        "instance_interactive_conv.fc_layer.weight": (c, 49 * c),
        "instance_interactive_conv.fc_layer.bias": (c,),
        "instance_interactive_conv.fc_norm.weight": (c,),
        "instance_interactive_conv.fc_norm.bias": (c,),
        "instance_interactive_conv_norm.weight": (c,), "instance_interactive_conv_norm.bias": (c,),
        "ffn.layers.0.0.weight": (ffn, c), "ffn.layers.0.0.bias": (ffn,),
        "ffn.layers.1.weight": (c, ffn), "ffn.layers.1.bias": (c,),
        "ffn_norm.weight": (c,), "ffn_norm.bias": (c,),
        "cls_fcs.0.weight": (c, c), "cls_fcs.1.weight": (c,), "cls_fcs.1.bias": (c,),
        "fc_cls.weight": (k, c), "fc_cls.bias": (k,),
        "fc_reg.weight": (4, c), "fc_reg.bias": (4,),
    }  # fmt: skip
    for i in (0, 3, 6):
        box[f"reg_fcs.{i}.weight"] = (c, c)
        box[f"reg_fcs.{i + 1}.weight"] = (c,)
        box[f"reg_fcs.{i + 1}.bias"] = (c,)
    mask = {
        "instance_interactive_conv.dynamic_layer.weight": (n, c),
        "instance_interactive_conv.dynamic_layer.bias": (n,),
        "instance_interactive_conv.norm_in.weight": (f,),
        "instance_interactive_conv.norm_in.bias": (f,),
        "instance_interactive_conv.norm_out.weight": (c,),
        "instance_interactive_conv.norm_out.bias": (c,),
        "upsample.weight": (c, c, 2, 2), "upsample.bias": (c,),
        "conv_logits.weight": (k, c, 1, 1), "conv_logits.bias": (k,),
    }  # fmt: skip
    for i in range(4):
        mask[f"convs.{i}.conv.weight"] = (c, c, 3, 3)
        for name in ("weight", "bias", "running_mean", "running_var"):
            mask[f"convs.{i}.bn.{name}"] = (c,)
        mask[f"convs.{i}.bn.num_batches_tracked"] = ()
    return {
        **{f"{prefix}.bbox_head.0.{key}": s for key, s in box.items()},
        **{f"{prefix}.mask_head.0.{key}": s for key, s in mask.items()},
    }


def test_stage_parameters_match_the_official_checkpoint_layout():
    """Same keys and shapes as roi_head.{bbox,mask}_head.0 of the official checkpoints, so a
    converter is a pure key mapping (backbone/neck aside)."""
    bbox, mask = DIIHead(num_classes=80), DynamicMaskHead(num_classes=80)
    ours = {f"roi_head.bbox_head.0.{k}": tuple(v.shape) for k, v in bbox.state_dict().items()}
    ours.update({f"roi_head.mask_head.0.{k}": tuple(v.shape) for k, v in mask.state_dict().items()})
    official = {k: tuple(v) for k, v in _official_keys("roi_head", 80).items()}
    assert ours == official
    rpn = EmbeddingRPNHead(100, 256).state_dict()
    assert {k: tuple(v.shape) for k, v in rpn.items()} == {
        "init_proposal_bboxes.weight": (100, 4),
        "init_proposal_features.weight": (100, 256),
    }


@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_mask_head_output_shape(norm):
    head = DynamicMaskHead(num_classes=3, in_channels=8, conv_dim=8, dynamic_channels=2, norm=norm)
    out = head(torch.randn(5, 8, 14, 14), torch.randn(5, 8))
    assert out.shape == (5, 3, 28, 28)


def test_roi_head_rejects_missing_features():
    cfg = get_cfg()
    with pytest.raises(ValueError, match="IN_FEATURES"):
        QueryRoIHead(cfg, {"p2": ShapeSpec(channels=8, stride=4)})


def test_mask_stage_uses_boxes_per_image():
    torch.manual_seed(0)
    head = _tiny_roi_head()
    feats = [torch.randn(2, 16, 64 // 2**i, 64 // 2**i) for i in range(2, 6)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)]
    out = head.mask_stage(1, feats, boxes, torch.randn(1, 16))
    assert out.shape == (1, 3, 28, 28)
