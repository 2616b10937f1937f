"""tools/convert_fastinst.py against the official FastInst key layout (spec A.12/A.13).

The official state dicts are generated here from the spec's key names and shapes (not from our
model); after conversion they must load into QuerySeg's FastInst with no missing or unexpected
key, and the converted modules must compute what the official layout computes: attention from the
packed ``in_proj`` (q, k, v row blocks, 8 heads, seq-first), the PPM-FPN pixel decoder, the
class / mask-embed MLPs and proposal head, and the R50-d-DCN stem and deformable bottleneck.
Each full-size model is built once per module (R50-D1, R101-D3, R50-d-DCN-D3).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from official_state import OfficialState  # noqa: E402

from common.convert.cli import model_from_config  # noqa: E402
from common.convert.core import CheckpointError, check_against_model, save_converted  # noqa: E402
from common.engine.checkpoint import QSCheckpointer  # noqa: E402
from tools import convert_fastinst  # noqa: E402

D, HEADS, FFN, CLASSES = 256, 8, 1024, 80
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
CONFIGS = {
    "R50_D1": ("fastinst_R50_ppm-fpn_D1_576_50ep_coco.yaml", dict(depth=50, dec_layers=1)),
    "R101_D3": ("fastinst_R101_ppm-fpn_D3_640_50ep_coco.yaml", dict(depth=101, dec_layers=3)),
    "R50dDCN_D3": (
        "fastinst_R50-d-DCN_ppm-fpn_D3_640_50ep_coco.yaml",
        dict(depth=50, dec_layers=3, resnet_d=True),
    ),
}


# ------------------------------------------------------------------------------------------------
# The official key layout, from the spec
# ------------------------------------------------------------------------------------------------


def official_fastinst_state(
    depth: int = 50,
    dec_layers: int = 1,
    resnet_d: bool = False,
    num_classes: int = CLASSES,
    seed: int = 0,
    zeros: bool = False,
) -> dict[str, torch.Tensor]:
    """An official FastInst ``model`` state dict (spec A.13; A.12 for the R50-d-DCN backbone)."""
    s = OfficialState(seed, zeros)
    # backbone
    if resnet_d:  # FastInst's timm-style ResNet-D: deep stem, avg-down shortcut, DCN in layer3/4
        s.t("backbone.conv1.0.weight", 32, 3, 3, 3)
        s.norm("backbone.conv1.1.", 32)
        s.t("backbone.conv1.3.weight", 32, 32, 3, 3)
        s.norm("backbone.conv1.4.", 32)
        s.t("backbone.conv1.6.weight", 64, 32, 3, 3)
        s.norm("backbone.bn1.", 64)
    else:  # Detectron2 ResNet
        s.t("backbone.stem.conv1.weight", 64, 3, 7, 7)
        s.norm("backbone.stem.conv1.norm.", 64)
    cin = 64
    for stage, n in enumerate(BLOCKS[depth]):
        width, cout = 64 * 2**stage, 256 * 2**stage
        for i in range(n):
            if resnet_d:
                p = f"backbone.layer{stage + 1}.{i}."
                names = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
            else:
                p = f"backbone.res{stage + 2}.{i}."
                names = [(f"conv{k}", f"conv{k}.norm") for k in (1, 2, 3)]
            shapes = [(width, cin, 1, 1), (width, width, 3, 3), (cout, width, 1, 1)]
            for (conv, norm), shape in zip(names, shapes):
                s.t(p + conv + ".weight", *shape, scale=1 / math.sqrt(shape[1] * shape[2] ** 2))
                s.norm(p + norm + ".", shape[0])
            if resnet_d and stage >= 2:
                s.t(p + "conv2_offset.weight", 18, width, 3, 3, scale=0.02)
                s.t(p + "conv2_offset.bias", 18, scale=0.2)
            if i == 0:
                if resnet_d:
                    s.t(p + "downsample.1.weight", cout, cin, 1, 1, scale=1 / math.sqrt(cin))
                    s.norm(p + "downsample.2.", cout)
                else:
                    s.t(p + "shortcut.weight", cout, cin, 1, 1, scale=1 / math.sqrt(cin))
                    s.norm(p + "shortcut.norm.", cout)
            cin = cout
    # pixel decoder (PPM-FPN): index 1 = res3 (highest resolution)
    pd = "sem_seg_head.pixel_decoder."
    for i, c in enumerate((512, 1024, 2048), start=1):
        s.t(f"{pd}adapter_{i}.weight", D, c, 1, 1, scale=1 / math.sqrt(c))
        s.norm(f"{pd}adapter_{i}.norm.", D, frozen=False)
        s.t(f"{pd}layer_{i}.weight", D, D, 3, 3, scale=1 / math.sqrt(9 * D))
        s.norm(f"{pd}layer_{i}.norm.", D, frozen=False)
    for i in range(4):
        s.t(f"{pd}ppm.stages.{i}.1.weight", D // 4, D, 1, 1, scale=1 / math.sqrt(D))
        s.t(f"{pd}ppm.stages.{i}.1.bias", D // 4)
    s.t(f"{pd}ppm.bottleneck.weight", D, 2 * D, 1, 1, scale=1 / math.sqrt(2 * D))
    s.t(f"{pd}ppm.bottleneck.bias", D)
    # transformer decoder
    pr = "sem_seg_head.predictor."
    s.t(pr + "meta_pos_embed", 1, D, 10, 10, scale=0.02)
    s.t(pr + "empty_query_features.weight", 8, D, scale=1.0)
    s.t(pr + "empty_query_pos_embed.weight", 8, D, scale=1.0)
    s.t(pr + "query_proposal.conv_proposal_cls_logits.0.weight", D, D, 3, 3, scale=0.02)
    s.t(pr + "query_proposal.conv_proposal_cls_logits.0.bias", D)
    s.t(pr + "query_proposal.conv_proposal_cls_logits.2.weight", num_classes + 1, D, 1, 1)
    s.t(pr + "query_proposal.conv_proposal_cls_logits.2.bias", num_classes + 1)
    for i in range(dec_layers):
        for name, attn in (
            ("transformer_query_cross_attention_layers", "multihead_attn"),
            ("transformer_query_self_attention_layers", "self_attn"),
            ("transformer_mask_cross_attention_layers", "multihead_attn"),
        ):
            p = f"{pr}{name}.{i}."
            s.t(p + attn + ".in_proj_weight", 3 * D, D, scale=1 / math.sqrt(D))
            s.t(p + attn + ".in_proj_bias", 3 * D)
            s.linear(p + attn + ".out_proj.", D, D)
            s.norm(p + "norm.", D, frozen=False)
        for name in ("transformer_query_ffn_layers", "transformer_mask_ffn_layers"):
            p = f"{pr}{name}.{i}."
            s.linear(p + "linear1.", FFN, D)
            s.linear(p + "linear2.", D, FFN)
            s.norm(p + "norm.", D, frozen=False)
    for j in range(dec_layers + 1):
        s.norm(f"{pr}decoder_query_norm_layers.{j}.", D, frozen=False)
        for head, out in (("class_embed_layers", num_classes + 1), ("mask_embed_layers", D)):
            for k, cout in enumerate((D, D, out)):
                s.linear(f"{pr}{head}.{j}.layers.{k}.", cout, D)
        s.linear(f"{pr}mask_features_layers.{j}.", D, D)
    # the criterion's class weights, registered twice (the same module)
    empty_weight = torch.ones(num_classes + 1)
    empty_weight[-1] = 0.1
    s["criterion.empty_weight"] = empty_weight
    s[pr + "criterion.empty_weight"] = empty_weight.clone()
    return dict(s)


# ------------------------------------------------------------------------------------------------
# Fixtures: each full-size model once
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            path = os.path.join(convert_fastinst.CONFIG_DIR, CONFIGS[name][0])
            cache[name] = model_from_config(path)[0]
        return cache[name]

    return get


@pytest.fixture(scope="module")
def converted(models):
    """name -> (official state, converted state, model with the converted weights loaded)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            src = official_fastinst_state(**CONFIGS[name][1])
            out, report = convert_fastinst.convert(src)
            model = models(name)
            check_against_model(out, model, report)
            assert report.ok, report.format()
            result = model.load_state_dict(out, strict=True)
            assert not result.missing_keys and not result.unexpected_keys
            cache[name] = (src, out, model)
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------
# Key coverage and config inference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_official_key_maps_and_loads(converted, name):
    src, out, model = converted(name)
    dropped = {"criterion.empty_weight", "sem_seg_head.predictor.criterion.empty_weight"}
    assert dropped <= set(src) and not dropped & set(out)
    assert len(out) == len(src) - 2 == len(model.state_dict())
    head = "sem_seg_head.predictor.transformer_query_cross_attention_layers.0.multihead_attn."
    assert torch.equal(out[head + "in_proj_weight"], src[head + "in_proj_weight"])


def test_resnet_d_backbone_renames(converted):
    src, out, _ = converted("R50dDCN_D3")
    pairs = {
        "backbone.conv1.0.weight": "backbone.stem.conv1.weight",
        "backbone.conv1.4.running_var": "backbone.stem.conv2.norm.running_var",
        "backbone.bn1.bias": "backbone.stem.conv3.norm.bias",
        "backbone.layer1.0.downsample.1.weight": "backbone.res2.0.shortcut.weight",
        "backbone.layer3.0.downsample.2.running_mean": "backbone.res4.0.shortcut.norm.running_mean",
        "backbone.layer4.2.conv2_offset.bias": "backbone.res5.2.conv2_offset.bias",
        "backbone.layer3.5.bn2.weight": "backbone.res4.5.conv2.norm.weight",
    }
    for official, ours in pairs.items():
        assert torch.equal(out[ours], src[official]), official


def test_config_is_read_off_the_checkpoint():
    for release, config in convert_fastinst.OFFICIAL_CHECKPOINTS.items():
        backbone = release.split("_")[1]
        state = official_fastinst_state(
            depth=101 if backbone == "R101" else 50,
            dec_layers=int(release.split("_x")[1][0]),
            resnet_d="dcn" in backbone,
            zeros=True,
        )
        assert os.path.basename(convert_fastinst.default_config(state)) == config, release
    with pytest.raises(CheckpointError, match="pass --config-file"):
        convert_fastinst.default_config(official_fastinst_state(dec_layers=2, zeros=True))


# ------------------------------------------------------------------------------------------------
# Same function as the official layout
# ------------------------------------------------------------------------------------------------


def _official_attention(sd, prefix, attn, q_in, k_in, v_in, mask=None):
    """nn.MultiheadAttention's definition on seq-first [L, B, D] inputs, from the packed in_proj
    (rows 0:D = q, D:2D = k, 2D:3D = v) and 8 heads of 32 channels; ``mask`` [B*8, L, S] bool."""
    w, b = sd[f"{prefix}{attn}.in_proj_weight"], sd[f"{prefix}{attn}.in_proj_bias"]
    q, k, v = (F.linear(x, w[i * D : (i + 1) * D], b[i * D : (i + 1) * D])
               for i, x in enumerate((q_in, k_in, v_in)))  # fmt: skip

    def heads(x):  # [L, B, D] -> [B*8, L, 32]
        return x.reshape(x.shape[0], -1, D // HEADS).transpose(0, 1)

    logits = heads(q) @ heads(k).transpose(1, 2) / math.sqrt(D // HEADS)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    out = (logits.softmax(-1) @ heads(v)).transpose(0, 1).reshape(q.shape[0], -1, D)
    out = F.linear(out, sd[f"{prefix}{attn}.out_proj.weight"], sd[f"{prefix}{attn}.out_proj.bias"])
    return out


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, (D,), sd[prefix + "weight"], sd[prefix + "bias"])


@torch.no_grad()
def test_attention_and_ffn_match_the_official_in_proj_layout(converted):
    src, _, model = converted("R50_D1")
    pred = model.sem_seg_head.predictor
    pr = "sem_seg_head.predictor."
    g = torch.Generator().manual_seed(1)
    B, L, S = 2, 108, 48
    tgt, qpos = torch.randn(L, B, D, generator=g), torch.randn(L, B, D, generator=g)
    mem, pos = torch.randn(S, B, D, generator=g), torch.randn(S, B, D, generator=g)
    mask = torch.rand(B * HEADS, L, S, generator=g) < 0.5
    mask[..., 0] = False  # no fully blocked row

    def bf(x):  # seq-first -> our batch-first
        return x.transpose(0, 1)

    # masked cross-attention (queries -> pixels), post-norm
    p = pr + "transformer_query_cross_attention_layers.0."
    ref = _layer_norm(tgt + _official_attention(src, p, "multihead_attn", tgt + qpos, mem + pos,
                                                mem, mask), src, p + "norm.")  # fmt: skip
    ours = pred.transformer_query_cross_attention_layers[0](
        bf(tgt), bf(mem), memory_mask=mask, pos=bf(pos), query_pos=bf(qpos)
    )
    torch.testing.assert_close(bf(ours), ref, rtol=1e-4, atol=1e-4)
    # self-attention over the queries
    p = pr + "transformer_query_self_attention_layers.0."
    ref = _layer_norm(tgt + _official_attention(src, p, "self_attn", tgt + qpos, tgt + qpos, tgt),
                      src, p + "norm.")  # fmt: skip
    ours = pred.transformer_query_self_attention_layers[0](bf(tgt), query_pos=bf(qpos))
    torch.testing.assert_close(bf(ours), ref, rtol=1e-4, atol=1e-4)
    # FFN
    p = pr + "transformer_mask_ffn_layers.0."
    hidden = F.relu(F.linear(tgt, src[p + "linear1.weight"], src[p + "linear1.bias"]))
    ref = _layer_norm(tgt + F.linear(hidden, src[p + "linear2.weight"], src[p + "linear2.bias"]),
                      src, p + "norm.")  # fmt: skip
    torch.testing.assert_close(pred.transformer_mask_ffn_layers[0](tgt), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_ppm_fpn_pixel_decoder_matches_the_official_layout(converted):
    src, _, model = converted("R50_D1")
    pd = "sem_seg_head.pixel_decoder."
    g = torch.Generator().manual_seed(2)
    feats = {
        "res3": torch.randn(1, 512, 16, 20, generator=g),
        "res4": torch.randn(1, 1024, 8, 10, generator=g),
        "res5": torch.randn(1, 2048, 4, 5, generator=g),
    }

    def conv_gn(x, name, relu, padding):
        x = F.conv2d(x, src[f"{pd}{name}.weight"], padding=padding)
        x = F.group_norm(x, 32, src[f"{pd}{name}.norm.weight"], src[f"{pd}{name}.norm.bias"])
        return F.relu(x) if relu else x

    def ppm(x):  # branches 1/2/3/6: pool, 1x1 conv (bias), ReLU, upsample; concat before x
        size = x.shape[-2:]
        priors = []
        for i, s in enumerate((1, 2, 3, 6)):
            y = F.conv2d(F.adaptive_avg_pool2d(x, s), src[f"{pd}ppm.stages.{i}.1.weight"],
                         src[f"{pd}ppm.stages.{i}.1.bias"])  # fmt: skip
            priors.append(F.interpolate(F.relu(y), size, mode="bilinear", align_corners=False))
        y = torch.cat([*priors, x], 1)
        return F.relu(
            F.conv2d(y, src[f"{pd}ppm.bottleneck.weight"], src[f"{pd}ppm.bottleneck.bias"])
        )

    def up(y, like):
        return F.interpolate(y, like.shape[-2:], mode="bilinear", align_corners=False)

    e5 = conv_gn(ppm(conv_gn(feats["res5"], "adapter_3", False, 0)), "layer_3", True, 1)
    lat4 = conv_gn(feats["res4"], "adapter_2", False, 0)
    e4 = conv_gn(lat4 + up(e5, lat4), "layer_2", True, 1)
    lat3 = conv_gn(feats["res3"], "adapter_1", False, 0)
    e3 = conv_gn(lat3 + up(e4, lat3), "layer_1", True, 1)
    _, ours = model.sem_seg_head.pixel_decoder.forward_features(feats)
    for a, b in zip(ours, (e5, e4, e3)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_prediction_heads_match_the_official_layout(converted):
    src, _, model = converted("R101_D3")
    pred, pr = model.sem_seg_head.predictor, "sem_seg_head.predictor."
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 100, D, generator=g)

    def mlp(prefix, y):
        for k in range(3):
            y = F.linear(y, src[f"{prefix}.layers.{k}.weight"], src[f"{prefix}.layers.{k}.bias"])
            y = F.relu(y) if k < 2 else y
        return y

    for j in range(4):
        torch.testing.assert_close(pred.class_embed_layers[j](x),
                                   mlp(f"{pr}class_embed_layers.{j}", x))  # fmt: skip
        torch.testing.assert_close(pred.mask_embed_layers[j](x),
                                   mlp(f"{pr}mask_embed_layers.{j}", x))  # fmt: skip
    logits = pred.class_embed_layers[3](x)
    assert logits.shape[-1] == CLASSES + 1  # no-object last in both
    # IA-query proposal head: 3x3 conv, ReLU, 1x1 conv to C + 1
    e4 = torch.randn(1, D, 6, 7, generator=g)
    p = pr + "query_proposal.conv_proposal_cls_logits."
    ref = F.conv2d(F.relu(F.conv2d(e4, src[p + "0.weight"], src[p + "0.bias"], padding=1)),
                   src[p + "2.weight"], src[p + "2.bias"])  # fmt: skip
    torch.testing.assert_close(pred.query_proposal.conv_proposal_cls_logits(e4), ref)


@torch.no_grad()
def test_resnet_d_dcn_stem_and_deformable_block_match_the_official_layout(converted):
    src, _, model = converted("R50dDCN_D3")
    bb = model.backbone
    g = torch.Generator().manual_seed(4)

    def frozen_bn(x, p):
        scale = src[p + "weight"] / torch.sqrt(src[p + "running_var"] + 1e-5)
        shift = src[p + "bias"] - src[p + "running_mean"] * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    img = torch.randn(1, 3, 32, 40, generator=g)
    y = F.relu(frozen_bn(F.conv2d(img, src["backbone.conv1.0.weight"], stride=2, padding=1),
                         "backbone.conv1.1."))  # fmt: skip
    y = F.relu(
        frozen_bn(F.conv2d(y, src["backbone.conv1.3.weight"], padding=1), "backbone.conv1.4.")
    )
    y = F.relu(frozen_bn(F.conv2d(y, src["backbone.conv1.6.weight"], padding=1), "backbone.bn1."))
    ref = F.max_pool2d(y, 3, 2, 1)
    torch.testing.assert_close(bb.stem(img), ref, rtol=1e-4, atol=1e-4)

    # layer3.0: DCNv1 3x3 (stride 2, offsets from conv2_offset) + avg-down shortcut
    x = torch.randn(1, 512, 8, 10, generator=g)
    p = "backbone.layer3.0."
    y = F.relu(frozen_bn(F.conv2d(x, src[p + "conv1.weight"]), p + "bn1."))
    offset = F.conv2d(y, src[p + "conv2_offset.weight"], src[p + "conv2_offset.bias"], stride=2,
                      padding=1)  # fmt: skip
    assert offset.abs().max() > 0.1  # a real deformation, not the zero-offset special case
    y = F.relu(frozen_bn(deform_conv2d(y, offset, src[p + "conv2.weight"], stride=2, padding=1),
                         p + "bn2."))  # fmt: skip
    y = frozen_bn(F.conv2d(y, src[p + "conv3.weight"]), p + "bn3.")
    short = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    short = frozen_bn(F.conv2d(short, src[p + "downsample.1.weight"]), p + "downsample.2.")
    torch.testing.assert_close(bb.res4[0](x), F.relu(y + short), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Refusal and the CLI
# ------------------------------------------------------------------------------------------------


def test_refuses_unmapped_keys_and_wrong_shapes(converted, tmp_path):
    src, _, model = converted("R50_D1")
    bad = dict(src)
    bad["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    w = "sem_seg_head.predictor.class_embed_layers.1.layers.2.weight"
    bad[w] = torch.zeros(91, D)  # a 90-class head
    out, report = convert_fastinst.convert(bad)
    check_against_model(out, model, report)
    assert report.unmapped == ["sem_seg_head.predictor.extra_head.weight"]
    assert [k for k, _, _ in report.shapes] == [w]
    dst = tmp_path / "bad.pth"
    with pytest.raises(CheckpointError, match="extra_head") as err:
        save_converted(out, report, str(dst), "bad.pth")
    assert "(91, 256) vs (81, 256)" in str(err.value)
    assert not dst.exists()


def test_cli_end_to_end(converted, tmp_path, capsys):
    src, _, model = converted("R50_D1")
    path = tmp_path / "fastinst_R50_ppm-fpn_x1_576_34.9.pth"
    torch.save({"model": src, "iteration": 368749}, path)
    dst = tmp_path / "converted.pth"
    assert convert_fastinst.main([str(path), str(dst)]) == 0
    assert "fastinst_R50_ppm-fpn_D1_576_50ep_coco.yaml" in capsys.readouterr().out
    key = "sem_seg_head.predictor.mask_features_layers.1.weight"
    with torch.no_grad():
        model.state_dict()[key].zero_()
    QSCheckpointer(model).load(str(dst))
    assert torch.equal(model.state_dict()[key], src[key])


def test_cli_refuses_without_writing(converted, tmp_path, capsys, monkeypatch):
    src, _, model = converted("R50_D1")
    import common.convert.cli as ckpt

    monkeypatch.setattr(ckpt, "model_from_config", lambda *a, **k: (model, None))
    bad = dict(src, **{"sem_seg_head.predictor.unknown.bias": torch.zeros(1)})
    path, dst = tmp_path / "official.pth", tmp_path / "out.pth"
    torch.save({"model": bad}, path)
    config = os.path.join(convert_fastinst.CONFIG_DIR, CONFIGS["R50_D1"][0])
    assert convert_fastinst.main([str(path), str(dst), "--config-file", config]) == 1
    assert "sem_seg_head.predictor.unknown.bias" in capsys.readouterr().err
    assert not dst.exists()
