"""K-Net's instance/panoptic initialisation, tensor by tensor, against the init the spec states
(/work/shared/specs/knet_queryinst.md, "Initialization": ZwwWayne/K-Net, whose detection code is
not on the package index; issue 18 item 4). The semantic heads are compared with a fresh
mmsegmentation build instead (tests/parity/test_parity_knet_init.py). Every parameter outside
the ImageNet ResNet must be covered by a rule."""

from __future__ import annotations

import math
import re

import pytest
import torch
from init_check import (
    Const,
    Normal,
    expected_from_rules,
    init_mismatches,
    torch_default_bias,
    xavier_uniform,
)

from common.convert.cli import model_from_config

PRIOR = -math.log((1 - 0.01) / 0.01)
U = r"kernel_update_heads\.\d+\."
NORMS = (
    r"(?:attention_norm|ffn_norm|kernel_update_conv\.(?:norm_in|norm_out|input_norm_in"
    r"|input_norm_out|fc_norm))"
)
#: Linear layers whose bias keeps PyTorch's default (1-d parameters are left alone by the heads'
#: Xavier pass)
DEFAULT_BIAS = (
    r"(?:kernel_update_conv\.(?:dynamic_layer|input_layer|input_gate|update_gate|fc_layer)"
    r"|ffn\.[03]|fc_mask)"
)


@pytest.mark.parametrize("config", ["knet_R50_1x_coco.yaml", "knet_R50_1x_coco_panoptic.yaml"])
def test_every_knet_tensor_follows_the_spec_init(config):
    torch.manual_seed(0)
    model, _ = model_from_config(f"projects/knet/configs/{config}")
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    rules = [
        # mmdet FPN neck: Xavier-uniform, zero bias
        (r"neck\.(?:lateral|fpn)_convs\.\d+\.weight", xavier_uniform),
        (r"neck\.(?:lateral|fpn)_convs\.\d+\.bias", Const(0.0)),
        # Semantic-FPN and loc/seg convs N(0, 0.01); their GN 1 / 0
        (r"kernel_head\.(?:localization_fpn\.\S+|loc_convs\.\d+|seg_convs\.\d+)\.norm\.weight",
         Const(1.0)),
        (r"kernel_head\.(?:localization_fpn\.\S+|loc_convs\.\d+|seg_convs\.\d+)\.norm\.bias",
         Const(0.0)),
        (r"kernel_head\.(?:localization_fpn\.\S+|loc_convs\.\d+|seg_convs\.\d+)\.weight",
         Normal(0.0, 0.01)),
        (r"kernel_head\.init_kernels\.weight", Normal(0.0, 1.0)),  # kernel_init_std = 1
        (r"kernel_head\.conv_seg\.weight", Normal(0.0, 0.01)),
        (r"kernel_head\.conv_seg\.bias", Const(PRIOR)),
        # update heads: Xavier on every matrix, focal prior on fc_cls, LN defaults; the MHA's own
        # zero biases; feat_transform's zero bias (mmcv ConvModule)
        (rf"{U}{NORMS}\.weight", Const(1.0)),
        # [Linear(no bias), LN, ReLU] blocks: the Linear Xavier, the LN 1 / 0
        (rf"{U}(?:cls|mask)_fcs\.\d+\.weight",
         lambda shape: xavier_uniform(shape) if len(shape) == 2 else Const(1.0)),
        (rf"{U}(?:cls|mask)_fcs\.\d+\.bias", Const(0.0)),
        (rf"{U}{NORMS}\.bias", Const(0.0)),
        (rf"{U}fc_cls\.bias", Const(PRIOR)),
        (rf"{U}attention\.(?:in_proj_bias|out_proj\.bias)", Const(0.0)),
        (rf"{U}feat_transform\.bias", Const(0.0)),
        (rf"{U}\S+\.weight|{U}attention\.in_proj_weight", xavier_uniform),
    ]  # fmt: skip
    expected, unmatched = expected_from_rules(state, rules, skip=("backbone.",))
    for key in list(unmatched):
        if re.fullmatch(rf"{U}{DEFAULT_BIAS}\.bias", key):
            expected[key] = torch_default_bias(tuple(state[key[:-4] + "weight"].shape))
            unmatched.remove(key)
    assert not unmatched, f"parameters without a stated init: {unmatched}"
    assert len(expected) > 100
    problems = init_mismatches(state, expected)
    assert not problems, f"{len(problems)} tensors off the spec's init:\n" + "\n".join(problems)
