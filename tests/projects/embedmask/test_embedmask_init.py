"""EmbedMask's fresh initialisation, tensor by tensor, against the init the spec states
(/work/shared/specs/fastinst_embedmask_ops.md, B.1-B.3; issue 18 item 4: the reference is not on
the package index, so the expected init is written from the spec). Every parameter outside the
(ImageNet-initialised) ResNet must be covered by a rule."""

from __future__ import annotations

import math

import pytest
import torch
from init_check import Const, Normal, expected_from_rules, init_mismatches, kaiming_uniform

from common.convert.cli import model_from_config

CONFIG = "projects/embedmask/configs/embedmask_R50_1x_coco.yaml"
H = r"proposal_generator\.fcos_head\."
E = r"embed_head\."
#: B.3: the margin bias log(-ln 0.5 / PRIOR_MARGIN^2) with PRIOR_MARGIN 2: p = 0.5 at distance 2
MARGIN_BIAS = math.log(-math.log(0.5) / 2.0**2)


def c2_xavier(shape):
    """FPN / P6-P7 convs (Detectron2 ``c2_xavier_fill``, maskrcnn-benchmark's
    ``conv_with_kaiming_uniform``): U(+-sqrt(3 / fan_in)), bias 0."""
    return kaiming_uniform(shape, a=1.0)


@pytest.fixture(scope="module")
def fresh_state():
    torch.manual_seed(0)
    model, _ = model_from_config(CONFIG)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_every_embedmask_tensor_follows_the_spec_init(fresh_state):
    rules = [
        # FPN P3-P5 and the P6/P7 convs
        (r"backbone\.(?:fpn_(?:lateral|output)\d|top_block\.p[67])\.weight", c2_xavier),
        (r"backbone\.(?:fpn_(?:lateral|output)\d|top_block\.p[67])\.bias", Const(0.0)),
        (r"backbone\.fpn_(?:lateral|output)\d\.norm\.weight", Const(1.0)),
        (r"backbone\.fpn_(?:lateral|output)\d\.norm\.bias", Const(0.0)),
        # B.1: towers and predictors N(0, 0.01), bias 0; the focal prior on cls_logits; Scale 1
        (rf"{H}(?:cls|bbox)_tower\.\d+\.weight", None),  # conv N(0, 0.01) or GN weight 1
        (rf"{H}(?:cls|bbox)_tower\.\d+\.bias", Const(0.0)),
        (rf"{H}(?:cls_logits|bbox_pred|ctrness)\.weight", Normal(0.0, 0.01)),
        (rf"{H}cls_logits\.bias", Const(-math.log((1 - 0.01) / 0.01))),
        (rf"{H}(?:bbox_pred|ctrness)\.bias", Const(0.0)),
        (rf"{H}scales\.\d+\.scale", Const(1.0)),
        # B.2/B.3 (maskrcnn-benchmark v2 head): convs N(0, 0.01), bias 0, margin bias the prior
        (rf"{E}mask_tower\.\d+\.weight", None),
        (rf"{E}mask_tower\.\d+\.bias", Const(0.0)),
        (rf"{E}(?:pixel|proposal)_(?:spatial|other)_embed_pred\.weight", Normal(0.0, 0.01)),
        (rf"{E}(?:pixel|proposal)_(?:spatial|other)_embed_pred\.bias", Const(0.0)),
        (rf"{E}proposal_margin_pred\.weight", Normal(0.0, 0.01)),
        (rf"{E}proposal_margin_pred\.bias", Const(MARGIN_BIAS)),
        (rf"{E}(?:margin_scales\.\d+|position_scale)\.scale", Const(1.0)),
    ]
    state = fresh_state
    # conv weights (4-d) N(0, 0.01); GroupNorm weights (1-d) in the same Sequential 1
    rules = [
        (p, r if r is not None else (lambda s: Normal(0.0, 0.01) if len(s) == 4 else Const(1.0)))
        for p, r in rules
    ]
    expected, unmatched = expected_from_rules(state, rules, skip=("backbone.bottom_up.",))
    assert not unmatched, f"parameters without a stated init: {unmatched}"
    assert len(expected) > 40
    problems = init_mismatches(state, expected)
    assert not problems, f"{len(problems)} tensors off the spec's init:\n" + "\n".join(problems)
