"""The EmbedMask v2 checkpoint converter covers every parameter of our COCO model."""

from __future__ import annotations

import os
import re
import sys

import pytest
from detectron2.modeling import build_model
from meta_arch_mixin import REPO

from common.engine import get_cfg, merge_config

sys.path.insert(0, os.path.join(REPO, "tools"))
from convert_embedmask_checkpoint import convert_key, convert_state_dict  # noqa: E402


def _to_v2(key: str) -> str:
    """Our key -> the maskrcnn-benchmark v2 name (spec B.9), written independently of the tool."""
    subs = [
        (r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.body.stem.bn1."),
        (r"^backbone\.bottom_up\.stem\.", "backbone.body.stem."),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.", "L{\\1}.\\2.downsample.1."),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.", "L{\\1}.\\2.downsample.0."),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.", "L{\\1}.\\2.bn\\3."),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.", "L{\\1}.\\2.conv\\3."),
        (r"^backbone\.fpn_lateral(\d)\.", "F{inner\\1}."),
        (r"^backbone\.fpn_output(\d)\.", "F{layer\\1}."),
        (r"^backbone\.top_block\.", "backbone.fpn.top_blocks."),
        (r"^proposal_generator\.fcos_head\.ctrness\.", "rpn.head.centerness."),
        (r"^proposal_generator\.fcos_head\.", "rpn.head."),
        (r"^embed_head\.", "rpn.head."),
    ]
    for pattern, repl in subs:
        key = re.sub(pattern, repl, key)
    key = re.sub(r"^L\{(\d)\}", lambda m: f"backbone.body.layer{int(m.group(1)) - 1}", key)
    return re.sub(
        r"^F\{(inner|layer)(\d)\}",
        lambda m: f"backbone.fpn.fpn_{m.group(1)}{int(m.group(2)) - 1}",
        key,
    )


def test_every_parameter_of_the_r50_model_has_a_v2_name():
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, "projects/embedmask/configs/embedmask_R50_1x_coco.yaml"),
                 ["MODEL.DEVICE", "cpu"])  # fmt: skip
    ours = build_model(cfg).state_dict()
    v2 = {"module." + _to_v2(k): v for k, v in ours.items()}
    assert "module.backbone.body.layer1.0.downsample.1.running_var" in v2
    assert "module.backbone.fpn.fpn_inner2.weight" in v2
    assert "module.rpn.head.proposal_margin_pred.bias" in v2
    converted = convert_state_dict(v2)
    assert set(converted) == set(ours)


def test_unknown_keys_are_an_error():
    with pytest.raises(KeyError, match="roi_heads"):
        convert_key("roi_heads.box_head.fc1.weight")
