"""tools/convert_embedmask.py against the official EmbedMask key layouts (spec B.9).

The maskrcnn-benchmark (yinghdb/EmbedMask v2 and v1.5) and AdelaiDet state dicts are generated
here from the spec's key names and shapes, not from our model. v2 and v1.5 must load into
QuerySeg's EmbedMask with no missing or unexpected key and compute what the official layout
computes (FCOS towers with conv/GN at 0/3/6/9 and 1/4/7/10, per-level scales, centerness on the
box tower; pixel and proposal embeddings with the scaled coordinates; per-dim and scalar margins);
the AdelaiDet port and a v1 checkpoint are refused with their modules listed. Each full-size
model (R50 v2, R50 v1.5) is built once.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from official_state import OfficialState  # noqa: E402

from common.convert.cli import model_from_config  # noqa: E402
from common.convert.core import (  # noqa: E402
    CheckpointError,
    check_against_model,
    convert_state_dict,
    save_converted,
)
from common.engine.checkpoint import QSCheckpointer  # noqa: E402
from tools import convert_embedmask  # noqa: E402

C, CLASSES, LEVELS = 256, 80, 5
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
R50_CONFIG = os.path.join(convert_embedmask.CONFIG_DIR, "embedmask_R50_1x_coco.yaml")
V15_OPTS = ["MODEL.EMBEDMASK.EMBED_DIM", "8", "MODEL.EMBEDMASK.MARGIN_PER_DIM", "False"]


# ------------------------------------------------------------------------------------------------
# Official key layouts, from the spec
# ------------------------------------------------------------------------------------------------


def _resnet(s: OfficialState, prefix: str, depth: int, d2_names: bool) -> None:
    """maskrcnn-benchmark (``body.layerN``, ``bnK``, ``downsample.{0,1}``) or Detectron2 names."""
    if d2_names:
        s.conv(prefix + "stem.conv1.", 64, 3, 7, bias=False)
        s.norm(prefix + "stem.conv1.norm.", 64)
    else:
        s.conv(prefix + "stem.conv1.", 64, 3, 7, bias=False)
        s.norm(prefix + "stem.bn1.", 64)
    cin = 64
    for stage, n in enumerate(BLOCKS[depth]):
        width, cout = 64 * 2**stage, 256 * 2**stage
        for i in range(n):
            p = f"{prefix}res{stage + 2}.{i}." if d2_names else f"{prefix}layer{stage + 1}.{i}."
            for k, (co, ci, ks) in enumerate(
                ((width, cin, 1), (width, width, 3), (cout, width, 1))
            ):
                s.conv(f"{p}conv{k + 1}.", co, ci, ks, bias=False)
                s.norm(f"{p}conv{k + 1}.norm." if d2_names else f"{p}bn{k + 1}.", co)
            if i == 0:
                s.conv(p + ("shortcut." if d2_names else "downsample.0."), cout, cin, 1, bias=False)
                s.norm(p + ("shortcut.norm." if d2_names else "downsample.1."), cout)
            cin = cout


def _tower(s: OfficialState, prefix: str) -> None:
    for i in range(4):  # Conv3x3 (0, 3, 6, 9), GN (1, 4, 7, 10), ReLU
        s.conv(f"{prefix}{3 * i}.", C, C, 3)
        s.norm(f"{prefix}{3 * i + 1}.", C, frozen=False)


def official_maskrcnn_benchmark_state(
    depth: int = 50, generation: str = "v2", seed: int = 0, zeros: bool = False
) -> dict[str, torch.Tensor]:
    """yinghdb/EmbedMask ``model`` state (DDP ``module.`` prefix): v2 (D = 16, per-dim margins
    + ``margin_scales``) or v1.5 (D = 8, one scalar margin)."""
    s = OfficialState(seed, zeros)
    _resnet(s, "backbone.body.", depth, d2_names=False)
    for i, cin in zip((2, 3, 4), (512, 1024, 2048)):
        s.conv(f"backbone.fpn.fpn_inner{i}.", C, cin, 1)
        s.conv(f"backbone.fpn.fpn_layer{i}.", C, C, 3)
    for p in ("p6", "p7"):
        s.conv(f"backbone.fpn.top_blocks.{p}.", C, C, 3)
    h = "rpn.head."
    for tower in ("cls_tower", "bbox_tower", "mask_tower"):
        _tower(s, f"{h}{tower}.")
    s.conv(h + "cls_logits.", CLASSES, C)
    s.conv(h + "bbox_pred.", 4, C)
    s.conv(h + "centerness.", 1, C)
    for i in range(LEVELS):
        s.scale(f"{h}scales.{i}.scale")
    dim = 16 if generation == "v2" else 8
    for who in ("proposal", "pixel"):
        s.conv(f"{h}{who}_spatial_embed_pred.", 2, C)
        s.conv(f"{h}{who}_other_embed_pred.", dim - 2, C)
    s.conv(h + "proposal_margin_pred.", dim if generation == "v2" else 1, C)
    if generation == "v2":
        for i in range(LEVELS):
            s.scale(f"{h}margin_scales.{i}.scale")
    s.scale(h + "position_scale.scale")
    return {"module." + k: v for k, v in s.items()}


def official_adelaidet_state(depth: int = 50, zeros: bool = True) -> dict[str, torch.Tensor]:
    """yinghdb/AdelaiDet EmbedMask ``model`` state (spec B.9; the shapes of the mask branch and
    the 128-channel heads follow its config: MASK_BRANCH.CHANNELS 128, 16-d embeddings)."""
    s = OfficialState(0, zeros)
    _resnet(s, "backbone.bottom_up.", depth, d2_names=True)
    for i, cin in zip((3, 4, 5), (512, 1024, 2048)):
        s.conv(f"backbone.fpn_lateral{i}.", C, cin, 1)
        s.conv(f"backbone.fpn_output{i}.", C, C, 3)
    for p in ("p6", "p7"):
        s.conv(f"backbone.top_block.{p}.", C, C, 3)
    f = "proposal_generator.fcos_head."
    _tower(s, f + "cls_tower.")
    _tower(s, f + "bbox_tower.")
    s.conv(f + "cls_logits.", CLASSES, C)
    s.conv(f + "bbox_pred.", 4, C)
    s.conv(f + "ctrness.", 1, C)
    for i in range(LEVELS):
        s.scale(f"{f}scales.{i}.scale")
    for i in range(3):
        s.conv(f"mask_branch.refine.{i}.0.", 128, C, 3, bias=False)
        s.norm(f"mask_branch.refine.{i}.1.", 128)
    for i in range(4):
        s.conv(f"mask_branch.tower.{i}.0.", 128, 128, 3, bias=False)
        s.norm(f"mask_branch.tower.{i}.1.", 128)
    s.conv("mask_branch.tower.4.", 128, 128, 3)
    for i in range(2):
        s.conv(f"mask_branch.seg_head.{i}.0.", 128, 128 if i else C, 3, bias=False)
        s.norm(f"mask_branch.seg_head.{i}.1.", 128)
    s.conv("mask_branch.logits.", CLASSES, 128, 1)
    s.conv("pixel_head.spatial_embed_head.", 2, 128)
    s.conv("pixel_head.free_embed_head.", 14, 128)
    s.conv("proposal_head.margin_conv.", 128, C, 1)
    s.conv("proposal_head.spatial_margin_head.", 2, 128)
    s.conv("proposal_head.free_margin_head.", 14, 128)
    s.conv("proposal_head.embed_conv.", 128, C, 1)
    for i in range(LEVELS):
        s.scale(f"proposal_head.margin_scales.{i}.scale")
    s.conv("proposal_head.embed_head.spatial_embed_head.", 2, 128)
    s.conv("proposal_head.embed_head.free_embed_head.", 14, 128)
    s["mask_pred.sizes_of_interest"] = torch.tensor([64.0, 128, 256, 512, 1024])
    s["mask_pred._iter"] = torch.zeros(1)
    return dict(s)


# ------------------------------------------------------------------------------------------------
# Fixtures: each full-size model once
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_v2():
    return model_from_config(R50_CONFIG)[0]


@pytest.fixture(scope="module")
def model_v15():
    return model_from_config(R50_CONFIG, V15_OPTS)[0]


def _strip(state):
    return {k.removeprefix("module."): v for k, v in state.items()}


@pytest.fixture(scope="module")
def v2(model_v2):
    """(official v2 state without ``module.``, converted, model with it loaded)."""
    src = _strip(official_maskrcnn_benchmark_state())
    out, report = convert_embedmask.convert(src)
    check_against_model(out, model_v2, report)
    assert report.ok, report.format()
    result = model_v2.load_state_dict(out, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return src, out, model_v2


# ------------------------------------------------------------------------------------------------
# maskrcnn-benchmark: v2 and v1.5
# ------------------------------------------------------------------------------------------------


def test_v2_every_key_maps_and_loads(v2):
    src, out, model = v2
    assert len(src) == len(out) == len(model.state_dict())
    pairs = {
        "backbone.body.stem.bn1.running_mean": "backbone.bottom_up.stem.conv1.norm.running_mean",
        "backbone.body.layer1.0.downsample.1.bias": "backbone.bottom_up.res2.0.shortcut.norm.bias",
        "backbone.body.layer3.5.bn2.bias": "backbone.bottom_up.res4.5.conv2.norm.bias",
        "backbone.fpn.fpn_inner2.weight": "backbone.fpn_lateral3.weight",
        "backbone.fpn.fpn_layer4.bias": "backbone.fpn_output5.bias",
        "backbone.fpn.top_blocks.p7.weight": "backbone.top_block.p7.weight",
        "rpn.head.centerness.bias": "proposal_generator.fcos_head.ctrness.bias",
        "rpn.head.cls_tower.10.weight": "proposal_generator.fcos_head.cls_tower.10.weight",
        "rpn.head.mask_tower.9.bias": "embed_head.mask_tower.9.bias",
        "rpn.head.margin_scales.4.scale": "embed_head.margin_scales.4.scale",
    }  # fmt: skip
    for official, ours in pairs.items():
        assert torch.equal(out[ours], src[official]), official
    assert convert_embedmask.embedmask_generation(src) == {"generation": "v2", "embed_dim": 16}
    assert convert_embedmask.model_overrides(src) == []


@torch.no_grad()
def test_frozen_bn_scales_as_maskrcnn_benchmark():
    """maskrcnn-benchmark FrozenBatchNorm2d: y = x * w / sqrt(var) + b - mean * w / sqrt(var), no
    eps; the converted Detectron2 FrozenBatchNorm2d (eps inside the sqrt) must give the same."""
    from detectron2.layers import FrozenBatchNorm2d

    src = _strip(official_maskrcnn_benchmark_state(zeros=True))
    p = "backbone.body.layer1.0.bn2."
    src[p + "weight"] = torch.tensor([1.5, 2.0] + [1.0] * 62)
    src[p + "bias"] = torch.tensor([0.5, -1.0] + [0.0] * 62)
    src[p + "running_mean"] = torch.tensor([1.0, 2.0] + [0.0] * 62)
    src[p + "running_var"] = torch.tensor([4e-5, 0.25] + [1.0] * 62)
    out, report = convert_embedmask.convert(src)
    assert not report.unmapped and not report.duplicates, report.format()
    bn = FrozenBatchNorm2d(64)
    assert bn.eps == convert_embedmask.D2_BN_EPS
    q = "backbone.bottom_up.res2.0.conv2.norm."
    bn.load_state_dict({k: out[q + k] for k in ("weight", "bias", "running_mean", "running_var")})
    x = torch.tensor([3.0, 1.0])[None, :, None, None].expand(1, 2, 1, 1)
    x = torch.cat([x, torch.zeros(1, 62, 1, 1)], 1)
    # by hand: channel 0: 1.5 / sqrt(4e-5) = 237.170825 -> (3 - 1) * 237.170825 + 0.5
    #          channel 1: 2.0 / sqrt(0.25) = 4 -> (1 - 2) * 4 - 1 = -5
    ref = torch.tensor([2 * 1.5 / 4e-5**0.5 + 0.5, -5.0])
    torch.testing.assert_close(bn(x)[0, :2, 0, 0], ref, rtol=1e-5, atol=0)
    # the heads' GroupNorms and everything else are copied unchanged
    tower = "rpn.head.cls_tower.1.weight"
    assert torch.equal(out["proposal_generator.fcos_head.cls_tower.1.weight"], src[tower])


def _levels(g, sizes=((8, 10), (4, 5), (2, 3), (1, 2), (1, 1))):
    return [torch.randn(1, C, h, w, generator=g) for h, w in sizes]


def _official_tower(src, prefix, x):
    for i in range(4):
        x = F.conv2d(x, src[f"{prefix}{3 * i}.weight"], src[f"{prefix}{3 * i}.bias"], padding=1)
        x = F.group_norm(
            x, 32, src[f"{prefix}{3 * i + 1}.weight"], src[f"{prefix}{3 * i + 1}.bias"]
        )
        x = F.relu(x)
    return x


def _conv3(src, name, x):
    return F.conv2d(x, src[name + ".weight"], src[name + ".bias"], padding=1)


@torch.no_grad()
def test_fcos_head_towers_match_the_official_layout(v2):
    src, _, model = v2
    feats = _levels(torch.Generator().manual_seed(1))
    ours = model.proposal_generator.fcos_head(feats)
    h = "rpn.head."
    for level, x in enumerate(feats):
        cls_t, box_t = (
            _official_tower(src, h + "cls_tower.", x),
            _official_tower(src, h + "bbox_tower.", x),
        )
        reg = F.relu(_conv3(src, h + "bbox_pred", box_t) * src[f"{h}scales.{level}.scale"])
        for name, ref in (
            ("logits", _conv3(src, h + "cls_logits", cls_t)),
            ("bbox_reg", reg),  # in units of the stride (NORM_REG_TARGETS), as in training
            ("ctrness", _conv3(src, h + "centerness", box_t)),  # CENTERNESS_ON_REG
            ("bbox_towers", box_t),
        ):
            torch.testing.assert_close(ours[name][level], ref, rtol=1e-4, atol=1e-5)


def _coords(h, w, stride):
    """[1, 2, h, w] (x, y) of the location centres: stride * index + stride // 2 (FCOS)."""
    ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
    return torch.stack([xs, ys]).float()[None] + stride // 2


@torch.no_grad()
def test_embedding_heads_match_the_official_v2_layout(v2):
    src, _, model = v2
    h, head = "rpn.head.", model.embed_head
    g = torch.Generator().manual_seed(2)
    strides = [8, 16, 32, 64, 128]
    towers = _levels(g)
    pos_scale = src[h + "position_scale.scale"]
    embed, margin = head.proposal_embedding(towers, strides)
    refs_e, refs_m = [], []
    for level, (t, stride) in enumerate(zip(towers, strides)):
        spatial = _conv3(src, h + "proposal_spatial_embed_pred", t)
        spatial = spatial + pos_scale * _coords(*t.shape[-2:], stride) / 100.0
        refs_e.append(torch.cat([spatial, _conv3(src, h + "proposal_other_embed_pred", t)], 1))
        raw = _conv3(src, h + "proposal_margin_pred", t / 32)
        raw = torch.cat([raw[:, :2] * src[f"{h}margin_scales.{level}.scale"], raw[:, 2:]], 1)
        refs_m.append(raw.exp())

    def flat(maps):
        return torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2)

    torch.testing.assert_close(embed, flat(refs_e), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(margin, flat(refs_m), rtol=1e-4, atol=1e-5)
    # pixel embedding on P3, upsampled x2 (MASK_SCALE_FACTOR) to stride 4
    p3 = towers[0]
    x = _official_tower(src, h + "mask_tower.", p3)
    spatial = _conv3(src, h + "pixel_spatial_embed_pred", x) + pos_scale * _coords(8, 10, 8) / 100
    ref = torch.cat([spatial, _conv3(src, h + "pixel_other_embed_pred", x)], 1)
    ref = F.interpolate(ref, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(head.pixel_embedding(p3, 8), ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_v15_scalar_margin_checkpoint_converts_for_its_model(model_v15):
    src = official_maskrcnn_benchmark_state(generation="v1.5", seed=3)
    assert convert_embedmask.embedmask_generation(_strip(src))["generation"] == "v1.5"
    assert convert_embedmask.model_overrides(_strip(src)) == V15_OPTS
    out, report = convert_embedmask.convert(_strip(src))
    check_against_model(out, model_v15, report)
    assert report.ok, report.format()
    model_v15.load_state_dict(out, strict=True)
    # one margin per proposal: exp(conv(box_tower / 32)), the same for all 8 dims
    tower = _levels(torch.Generator().manual_seed(4))[:1]
    _, margin = model_v15.embed_head.proposal_embedding(tower, [8])
    name = "module.rpn.head.proposal_margin_pred"
    ref = F.conv2d(tower[0] / 32, src[name + ".weight"], src[name + ".bias"], padding=1).exp()
    torch.testing.assert_close(margin, ref.flatten(2).transpose(1, 2).expand(-1, -1, 8))


def test_v1_margin_is_refused_with_a_listing():
    src = _strip(official_maskrcnn_benchmark_state(zeros=True))
    src["rpn.head.proposal_margin_pred.weight"] = torch.zeros(1, 4, 1, 1)
    src["rpn.head.proposal_margin_pred.bias"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="v1 checkpoint") as err:
        convert_embedmask.convert(src)
    assert "rpn.head.proposal_margin_pred.weight (1, 4, 1, 1)" in str(err.value)


def test_refuses_unmapped_keys_and_wrong_shapes(v2, tmp_path):
    src, _, model = v2
    bad = dict(src)
    bad["rpn.head.box_tower_dcn.0.weight"] = torch.zeros(1)
    bad["rpn.head.cls_logits.weight"] = torch.zeros(90, C, 3, 3)  # a 90-class head
    out, report = convert_embedmask.convert(bad)
    check_against_model(out, model, report)
    assert report.unmapped == ["rpn.head.box_tower_dcn.0.weight"]
    assert [k for k, *_ in report.shapes] == ["proposal_generator.fcos_head.cls_logits.weight"]
    dst = tmp_path / "bad.pth"
    with pytest.raises(CheckpointError, match="box_tower_dcn"):
        save_converted(out, report, str(dst), "bad.pth")
    assert not dst.exists()


# ------------------------------------------------------------------------------------------------
# AdelaiDet port
# ------------------------------------------------------------------------------------------------


def test_adelaidet_detector_maps_but_its_embedding_generation_is_refused(model_v2):
    src = official_adelaidet_state()
    foreign = [k for k in src if k.startswith(tuple(convert_embedmask.ADELAIDET_ONLY))]
    # what maps (backbone + FCOS) is exactly QuerySeg's; only embed_head.* would be left random
    out, report = convert_state_dict(src, convert_embedmask.embedmask_rules("adelaidet"))
    assert sorted(report.unmapped) == sorted(foreign)
    check_against_model(out, model_v2, report)
    assert not report.unexpected and not report.shapes and not report.duplicates
    assert report.missing and all(k.startswith("embed_head.") for k in report.missing)
    # ... so the converter refuses, naming every module of the other generation
    with pytest.raises(CheckpointError) as err:
        convert_embedmask.convert(src, fmt="adelaidet")
    msg = str(err.value)
    for prefix in convert_embedmask.ADELAIDET_ONLY:
        assert f"{prefix}* (" in msg
    assert all(k in msg for k in foreign)
    assert os.path.basename(convert_embedmask.default_config(src)) == "embedmask_R50_1x_coco.yaml"


def test_format_mismatch_is_named():
    with pytest.raises(CheckpointError, match="pass --format adelaidet"):
        convert_embedmask.convert(official_adelaidet_state(), fmt="maskrcnn-benchmark")
    src = _strip(official_maskrcnn_benchmark_state(zeros=True))
    with pytest.raises(CheckpointError, match="pass --format maskrcnn-benchmark"):
        convert_embedmask.convert(src, fmt="adelaidet")


def test_config_is_read_off_the_depth():
    r101 = _strip(official_maskrcnn_benchmark_state(depth=101, zeros=True))
    assert convert_embedmask.default_config(r101).endswith("embedmask_R101_ms_3x_coco.yaml")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def test_cli_end_to_end(v2, tmp_path, capsys):
    src, _, model = v2
    official = {"module." + k: v for k, v in src.items()}
    path = tmp_path / "embed_mask_R50_1x.pth"
    solver = {"optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
              "scheduler": {"last_epoch": 90000, "warmup_method": "constant"}}  # fmt: skip
    torch.save({"model": official, **solver, "iteration": 90000}, path)
    dst = tmp_path / "converted.pth"
    assert convert_embedmask.main([str(path), str(dst)]) == 0
    assert "embedmask_R50_1x_coco.yaml" in capsys.readouterr().out
    key = "embed_head.proposal_margin_pred.bias"
    with torch.no_grad():
        model.state_dict()[key].zero_()
    QSCheckpointer(model).load(str(dst))
    assert torch.equal(model.state_dict()[key], src["rpn.head.proposal_margin_pred.bias"])


def test_cli_accepts_format_before_the_paths(v2, tmp_path, monkeypatch):
    import common.convert.cli as ckpt

    src, _, model = v2
    monkeypatch.setattr(ckpt, "model_from_config", lambda *a, **k: (model, None))
    path, dst = tmp_path / "embed_mask_R50_1x.pth", tmp_path / "converted.pth"
    torch.save({"model": src}, path)
    argv = ["--format", "maskrcnn-benchmark", str(path), str(dst)]
    assert convert_embedmask.main(argv) == 0
    assert dst.exists()


def test_cli_refuses_adelaidet_without_writing(model_v2, tmp_path, capsys, monkeypatch):
    import common.convert.cli as ckpt

    monkeypatch.setattr(ckpt, "model_from_config", lambda *a, **k: (model_v2, None))
    path, dst = tmp_path / "EmbedMask_MS_R_50_1x.pth", tmp_path / "out.pth"
    torch.save({"model": official_adelaidet_state()}, path)
    assert convert_embedmask.main([str(path), str(dst), "--format", "adelaidet"]) == 1
    err = capsys.readouterr().err
    assert "mask_branch.* (" in err and "proposal_head.embed_conv.weight" in err
    assert not dst.exists()
