"""FastInst's fresh initialisation, tensor by tensor, against the init the spec states
(/work/shared/specs/fastinst_embedmask_ops.md, A.2-A.5; issue 18 item 4: the reference is not on
the package index, so the expected init is written from the spec). Every parameter outside the
(ImageNet-initialised) ResNet must be covered by a rule."""

from __future__ import annotations

import math

import pytest
import torch
from init_check import (
    Const,
    Dist,
    expected_from_rules,
    init_mismatches,
    kaiming_uniform,
    torch_default_bias,
    xavier_uniform,
)

from common.convert.cli import model_from_config

CONFIG = "projects/fastinst/configs/fastinst_R50_ppm-fpn_D3_640_50ep_coco.yaml"
P = r"sem_seg_head\.pixel_decoder\."
D = r"sem_seg_head\.predictor\."
LAYERS = (
    rf"{D}transformer_(?:mask_cross_attention|query_cross_attention|query_self_attention"
    r"|mask_ffn|query_ffn)_layers\.\d+\."
)


def c2_xavier(shape) -> Dist:
    """fvcore ``c2_xavier_fill``: Kaiming-uniform with a=1, i.e. U(+-sqrt(3 / fan_in))."""
    return kaiming_uniform(shape, a=1.0)


def _bias_of(state, key):
    return torch_default_bias(tuple(state[key[: -len("bias")] + "weight"].shape))


@pytest.fixture(scope="module")
def fresh_state():
    torch.manual_seed(0)
    model, _ = model_from_config(CONFIG)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_every_fastinst_tensor_follows_the_spec_init(fresh_state):
    state = fresh_state
    default_bias = lambda key: _bias_of(state, key)  # noqa: E731
    rules = [
        # A.2: lateral 1x1 / output 3x3 convs (no bias) c2_xavier_fill; GN affine 1 / 0
        (rf"{P}(?:adapter|layer)_\d\.weight", c2_xavier),
        (rf"{P}(?:adapter|layer)_\d\.norm\.weight", Const(1.0)),
        (rf"{P}(?:adapter|layer)_\d\.norm\.bias", Const(0.0)),
        # PPM 1x1 convs with bias: the spec states no init; PyTorch's default (as the official
        # module leaves them)
        (rf"{P}ppm\.(?:stages\.\d\.1|bottleneck)\.weight", kaiming_uniform),
        # A.4: meta_pos_embed, uninitialised upstream (issue #57): trunc-normal std 0.02 here
        (rf"{D}meta_pos_embed", Dist("trunc_normal", 0.0, 0.02)),
        # A.3: aux queries nn.Embedding (N(0, 1)); proposal head: default PyTorch init
        (rf"{D}empty_query_(?:features|pos_embed)\.weight", Dist("normal", 0.0, 1.0)),
        (rf"{D}query_proposal\.conv_proposal_cls_logits\.\d\.weight", kaiming_uniform),
        # A.5: every attention / FFN matrix Xavier-uniform; nn.MultiheadAttention's own zero
        # biases; FFN biases PyTorch's default; LayerNorms 1 / 0
        (rf"{LAYERS}(?:multihead_attn|self_attn)\.(?:in_proj_weight|out_proj\.weight)",
         xavier_uniform),
        (rf"{LAYERS}(?:multihead_attn|self_attn)\.(?:in_proj_bias|out_proj\.bias)", Const(0.0)),
        (rf"{LAYERS}linear\d\.weight", xavier_uniform),
        (rf"{LAYERS}norm\.weight", Const(1.0)),
        (rf"{LAYERS}norm\.bias", Const(0.0)),
        (rf"{D}decoder_query_norm_layers\.\d+\.weight", Const(1.0)),
        (rf"{D}decoder_query_norm_layers\.\d+\.bias", Const(0.0)),
        # prediction heads (class / mask-embed MLPs, mask-feature projections): default
        (rf"{D}(?:class_embed_layers\.\d+\.layers|mask_embed_layers\.\d+\.layers)\.\d\.weight",
         kaiming_uniform),
        (rf"{D}mask_features_layers\.\d+\.weight", kaiming_uniform),
    ]  # fmt: skip
    expected, unmatched = expected_from_rules(
        state, rules, skip=("backbone.",)
    )  # ResNet: ImageNet weights
    # PyTorch-default biases: U(+-1/sqrt(fan_in)) of their own layer
    for key in list(unmatched):
        if key.endswith(".bias") and (
            key.startswith("sem_seg_head.pixel_decoder.ppm.")
            or ".query_proposal." in key
            or ("_ffn_layers." in key and ".linear" in key)
            or "_embed_layers." in key
            or "mask_features_layers." in key
        ):
            expected[key] = default_bias(key)
            unmatched.remove(key)
    assert not unmatched, f"parameters without a stated init: {unmatched}"
    assert len(expected) > 100
    problems = init_mismatches(state, expected)
    assert not problems, f"{len(problems)} tensors off the spec's init:\n" + "\n".join(problems)


def test_init_check_tells_gains_apart(fresh_state):
    """The check is sharp enough to fail a 10 % gain error on a real layer (and a wrong law)."""
    w = next(v for k, v in fresh_state.items() if k.endswith("linear1.weight"))
    law = xavier_uniform(tuple(w.shape))
    assert init_mismatches({"w": w}, {"w": law}) == []
    assert init_mismatches({"w": w * 1.1}, {"w": law})
    bound = law.b
    normal_same_std = Dist("normal", 0.0, bound / math.sqrt(3))
    assert init_mismatches({"w": w}, {"w": normal_same_std})
