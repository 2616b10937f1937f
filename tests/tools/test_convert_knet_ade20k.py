"""The seven K-Net ADE20K configs against the mmseg 1.2.2 models they reproduce (issue 18).

``tests/data/knet_ade20k_mmseg_layouts.json.gz`` was written by ``scripts/knet_ade20k_layouts.py``
from the real references (mmseg 1.2.2 / mmengine 0.10.7, the parity suite's install): for every
row the mmseg model's ``state_dict`` key -> shape, mmengine's optimizer parameter groups and the
config itself. Here, without the references:

- every released layout converts onto the QuerySeg model of its config with no unmapped,
  missing or unexpected key and no shape mismatch (the converter test of each row);
- every QuerySeg parameter gets the learning rate and weight decay mmengine gives its mmseg
  counterpart (``paramwise_cfg`` of the Swin rows included);
- every hyper-parameter that shapes the model or its training equals the mmseg config's.
"""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY

from common.convert.core import check_against_model
from common.engine import get_cfg, get_param_groups, merge_config
from tools import convert_knet as ck

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "projects", "knet", "configs")
FIXTURE = os.path.join(REPO, "tests", "data", "knet_ade20k_mmseg_layouts.json.gz")

with gzip.open(FIXTURE, "rt") as _f:
    _DATA = json.load(_f)
ROWS = _DATA["rows"]


def test_fixture_comes_from_the_pinned_references():
    assert _DATA["versions"] == {
        "mmengine": "0.10.7", "mmcv-lite": "2.1.0", "mmdet": "3.3.0", "mmsegmentation": "1.2.2"
    }  # fmt: skip
    assert len(ROWS) == 7
    assert sorted(ROWS) == sorted(
        f for f in os.listdir(CONFIGS) if f.startswith("knet_") and "ade20k" in f
    )


def _cfg(config: str):
    cfg = get_cfg()
    merge_config(cfg, os.path.join(CONFIGS, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return cfg


def _meta_model(cfg):
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg).eval()


def _official(row) -> dict[str, torch.Tensor]:
    return {
        k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("_tracked") else None)
        for k, s in row["state_dict"].items()
    }


@pytest.mark.parametrize("config", sorted(ROWS))
def test_released_layout_converts(config):
    """The converter maps every key of the mmseg model onto the QuerySeg model of the row with
    the model's shape (fails on any shape mismatch, e.g. 256-d UPerNet kernels)."""
    cfg = _cfg(config)
    model = _meta_model(cfg)
    state, report = ck.convert_knet(_official(ROWS[config]), "semantic", model.state_dict().keys())
    check_against_model(state, model, report)
    assert report.ok, f"{config}:\n{report.format()}"
    incompatible = model.load_state_dict(state, strict=True, assign=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys


def _name_map(official: dict[str, torch.Tensor]) -> dict[str, str]:
    """mmseg parameter name -> QuerySeg name, by the converter's own rules (first match)."""
    out = {}
    for key in official:
        for rule in ck.semantic_rules(official):
            m = rule._re.fullmatch(key)
            if m is None:
                continue
            if rule.target is not None:
                assert isinstance(rule.target, str), key  # no parameter is split
                out[key] = m.expand(rule.target)
            break
    return out


@pytest.mark.parametrize("config", sorted(ROWS))
def test_optimizer_groups_match_mmengine(config):
    """LR and weight decay per parameter = mmengine's ``DefaultOptimWrapperConstructor`` on the
    mmseg model (Swin rows: decay 0 exactly on the names holding 'norm' / the position tables)."""
    row = ROWS[config]
    cfg = _cfg(config)
    ours = {g["name"]: g for g in get_param_groups(cfg, _meta_model(cfg))}
    names = _name_map(_official(row))
    theirs = {names[n]: (lr, wd) for lr, wd, group in row["param_groups"] for n in group}
    assert sorted(theirs) == sorted(ours)
    wrong = [
        (n, (ours[n]["lr"], ours[n]["weight_decay"]), theirs[n])
        for n in sorted(ours)
        if ours[n]["lr"] != pytest.approx(theirs[n][0], rel=1e-12)
        or ours[n]["weight_decay"] != pytest.approx(theirs[n][1], rel=1e-12, abs=0)
    ]
    assert not wrong, f"{len(wrong)} parameters differ (name, ours, mmseg): {wrong[:10]}"
    opt = row["config"]["optim_wrapper"]
    assert opt["optimizer"]["type"] == "AdamW" and cfg.SOLVER.OPTIMIZER == "ADAMW"
    assert tuple(opt["optimizer"].get("betas", (0.9, 0.999))) == tuple(cfg.SOLVER.BETAS)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model"
    assert (clip.CLIP_VALUE, clip.NORM_TYPE) == (opt["clip_grad"]["max_norm"], 2.0)
    assert opt["clip_grad"]["norm_type"] == 2


_HEADS = {"FCNHead": "FCN", "PSPHead": "PSP", "ASPPHead": "ASPP", "UPerHead": "UPER"}


@pytest.mark.parametrize("config", sorted(ROWS))
def test_hyperparameters_match_mmseg(config):
    """Every key that shapes the model or its training equals the mmseg config's value (the
    table of projects/knet/README.md)."""
    c = ROWS[config]["config"]
    cfg = _cfg(config)
    k, s, sol, inp = cfg.MODEL.KNET, cfg.MODEL.KNET.SEMANTIC, cfg.SOLVER, cfg.INPUT
    m = c["model"]
    dec, aux = m["decode_head"], m["auxiliary_head"]
    gen, upd = dec["kernel_generate_head"], dec["kernel_update_head"]
    assert m["test_cfg"] == {"mode": "whole"}
    # iterative decode head: 3 kernel update heads, all alike
    assert dec["num_stages"] == k.NUM_STAGES == len(upd) == 3
    assert all(u == upd[0] for u in upd)
    u = upd[0]
    assert u["num_classes"] == 150 == cfg.MODEL.NUM_CLASSES
    assert u["in_channels"] == u["out_channels"] == s.CHANNELS == gen["channels"]
    assert u["num_heads"] == k.NUM_HEADS and u["feedforward_channels"] == k.FEEDFORWARD_DIM
    assert u["num_ffn_fcs"] == 2 and u["with_ffn"]  # QuerySeg's FFN: Linear-ReLU-Linear
    assert u["num_mask_fcs"] == k.NUM_MASK_FCS and u["dropout"] == k.DROPOUT
    assert u["conv_kernel_size"] == k.CONV_KERNEL_SIZE
    assert u["feat_transform_cfg"] == {"conv_cfg": {"type": "Conv2d"}, "act_cfg": None}
    kuc = u["kernel_updator_cfg"]
    assert kuc["in_channels"] == kuc["feat_channels"] == kuc["out_channels"] == k.UPDATOR_DIM
    # kernel generate head (stage 0)
    assert _HEADS[gen["type"]] == s.DECODE_HEAD
    assert gen["dropout_ratio"] == s.DROPOUT and gen["num_classes"] == 150
    assert gen["norm_cfg"]["type"] == s.NORM == "SyncBN"
    assert not gen["align_corners"]
    in_index = gen["in_index"] if isinstance(gen["in_index"], list) else [gen["in_index"]]
    assert [f"res{i + 2}" for i in in_index] == list(s.IN_FEATURES)
    if s.DECODE_HEAD in ("PSP", "UPER"):
        assert list(gen["pool_scales"]) == list(s.POOL_SCALES)
    if s.DECODE_HEAD == "ASPP":
        assert list(gen["dilations"]) == list(s.ASPP_DILATIONS)
    if s.DECODE_HEAD == "FCN":
        assert (gen["num_convs"], gen["concat_input"]) == (s.FCN_NUM_CONVS, s.FCN_CONCAT_INPUT)
    ce = {"type": "CrossEntropyLoss", "use_sigmoid": False}
    assert gen["loss_decode"] == {**ce, "loss_weight": s.LOSS_WEIGHT}
    # auxiliary FCN head (QuerySeg: one conv, no concat, the decode head's dropout and norm)
    assert f"res{aux['in_index'] + 2}" == s.AUX_IN_FEATURE
    assert aux["channels"] == s.AUX_CHANNELS and aux["dropout_ratio"] == s.DROPOUT
    assert (aux["type"], aux["num_convs"], aux["concat_input"]) == ("FCNHead", 1, False)
    assert aux["loss_decode"] == {**ce, "loss_weight": s.AUX_WEIGHT}
    # backbone
    b = m["backbone"]
    if b["type"] == "ResNetV1c":
        r = cfg.MODEL.RESNETS
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_vd_backbone" and r.DEEP_STEM
        assert b["depth"] == r.DEPTH and b["contract_dilation"] == r.CONTRACT_DILATION
        assert list(b["dilations"]) == [1, 1, r.RES4_DILATION, r.RES5_DILATION]
        assert list(b["strides"]) == [1, 2, 1 if r.RES4_DILATION > 1 else 2,
                                      1 if r.RES5_DILATION > 1 else 2]  # fmt: skip
        assert b["norm_cfg"]["type"] == r.NORM and not b["norm_eval"]
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and not r.STRIDE_IN_1X1
    else:
        w = cfg.MODEL.SWIN
        assert b["type"] == "SwinTransformer" and cfg.MODEL.BACKBONE.NAME == "build_swin_backbone"
        assert (b["embed_dims"], list(b["depths"]), list(b["num_heads"])) == (
            w.EMBED_DIM, list(w.DEPTHS), list(w.NUM_HEADS))  # fmt: skip
        assert (b["window_size"], b["mlp_ratio"], b["qkv_bias"]) == (
            w.WINDOW_SIZE, w.MLP_RATIO, w.QKV_BIAS)  # fmt: skip
        assert (b["drop_rate"], b["attn_drop_rate"], b["drop_path_rate"]) == (
            w.DROP_RATE, w.ATTN_DROP_RATE, w.DROP_PATH_RATE)  # fmt: skip
        assert not b["use_abs_pos_embed"] and b["patch_norm"]
        assert list(b["out_indices"]) == [0, 1, 2, 3]
    # optimizer, schedule, batch
    opt = c["optim_wrapper"]["optimizer"]
    assert (opt["lr"], opt["weight_decay"]) == (sol.BASE_LR, sol.WEIGHT_DECAY)
    warm, steps = c["param_scheduler"]
    assert warm["type"] == "LinearLR" and sol.WARMUP_METHOD == "linear"
    assert (warm["start_factor"], warm["begin"], warm["end"]) == (
        sol.WARMUP_FACTOR, 0, sol.WARMUP_ITERS)  # fmt: skip
    # mmengine counts MultiStepLR milestones from its `begin` (checked against mmengine 0.10.7)
    assert steps["type"] == "MultiStepLR" and steps.get("gamma", 0.1) == sol.GAMMA
    assert [steps["begin"] + x for x in steps["milestones"]] == list(sol.STEPS)
    assert c["train_cfg"]["max_iters"] == steps["end"] == sol.MAX_ITER
    assert 8 * c["batch_size"] == sol.IMS_PER_BATCH
    # data: RandomResize(scale=(2048, S), ratio 0.5-2.0) -> RandomCrop(cat_max_ratio 0.75) ->
    # flip -> photometric; test Resize((2048, S), keep_ratio); pad to the crop in training
    crop = tuple(m["data_preprocessor"]["size"])
    train, test = c["train_pipeline"], c["test_pipeline"]
    if config == "knet_upernet_SwinL_80k_640_ade20k.yaml":
        # the 1.2.2 file loads with the base 512 pipelines (README); the 640 pipeline it states:
        train = [dict(t) for t in train]
        train[2]["scale"], train[3]["crop_size"] = [2048, 640], [640, 640]
        test = [dict(t) for t in test]
        test[1]["scale"] = [2048, 640]
    resize, rcrop = train[2], train[3]
    assert resize["type"] == "RandomResize" and list(resize["ratio_range"]) == [0.5, 2.0]
    long_side, short = resize["scale"]
    assert (min(inp.MIN_SIZE_TRAIN), max(inp.MIN_SIZE_TRAIN)) == (short // 2, short * 2)
    assert inp.MAX_SIZE_TRAIN == long_side * 2
    assert tuple(rcrop["crop_size"]) == crop == tuple(inp.CROP.SIZE)
    assert inp.CROP.SINGLE_CATEGORY_MAX_AREA == rcrop["cat_max_ratio"]
    assert inp.SIZE_DIVISIBILITY == crop[0]
    assert [t["type"] for t in train[4:6]] == ["RandomFlip", "PhotoMetricDistortion"]
    assert test[1]["type"] == "Resize" and test[1]["keep_ratio"]
    assert (inp.MAX_SIZE_TEST, inp.MIN_SIZE_TEST) == tuple(test[1]["scale"])
    # multi-scale + flip test (TEST.SEM_SEG_TTA): mmseg's ratios and flip
    tta = c["tta_pipeline"][1]["transforms"]
    assert [t["scale_factor"] for t in tta[0]] == list(cfg.TEST.SEM_SEG_TTA.RATIOS)
    assert [t["prob"] for t in tta[1]] == [0.0, 1.0] and cfg.TEST.SEM_SEG_TTA.FLIP
