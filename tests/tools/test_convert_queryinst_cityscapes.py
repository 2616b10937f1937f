"""tools/convert_queryinst.py --to-cityscapes: an official COCO QueryInst checkpoint (spec B7
layout, generated from the spec) or a QuerySeg COCO one becomes the initialisation of the
Cityscapes config: every stage's classifier and mask-logit rows land on the Cityscapes class of
the same COCO name, rider (no COCO class) keeps the model's own initialisation (or takes the row
``--class-source rider=person`` names), and the result loads strictly."""

from __future__ import annotations

import math
import os

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY

from common.convert.core import check_against_model
from common.convert.rules import MMDET_COCO_CLASSES
from common.engine import get_cfg, merge_config
from common.engine.checkpoint import QSCheckpointer
from tests.tools.test_convert_queryinst import (
    CONFIGS,
    R50_1X,
    SMALL,
    SMALL_OPTS,
    materialise,
    meta_model,
    mmdet_resnet_shapes,
    official_head_shapes,
)
from tools import convert_queryinst

CITYSCAPES_CONFIG = os.path.join(CONFIGS, "queryinst_R50_FPN_300q_ms_24k_cityscapes.yaml")
CITYSCAPES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # the DIIHead's fc_cls bias at initialisation


def test_default_cityscapes_config_is_the_one_shipped():
    assert os.path.samefile(
        os.path.join(CONFIGS, os.path.basename(convert_queryinst.CITYSCAPES_CONFIG)),
        CITYSCAPES_CONFIG,
    )


def test_full_size_official_checkpoint_fits_the_cityscapes_config():
    shapes = mmdet_resnet_shapes(50) | official_head_shapes(num_proposals=300)
    target = meta_model(CITYSCAPES_CONFIG).state_dict()
    assert target["roi_head.bbox_head.5.fc_cls.weight"].shape == (8, 256)
    converted, report = convert_queryinst.convert_queryinst_to_classes(
        materialise(shapes, "meta"), CITYSCAPES, target
    )
    check_against_model(converted, target, report)
    assert report.ok, report.format()


def _cityscapes_model():
    cfg = get_cfg()
    merge_config(cfg, CITYSCAPES_CONFIG, [*SMALL_OPTS, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return META_ARCH_REGISTRY.get("QueryInst")(cfg).eval()


@pytest.fixture(scope="module")
def official():
    return materialise(mmdet_resnet_shapes(50) | official_head_shapes(**SMALL))


def _class_rows(state, stage_prefix):
    return {
        "cls_w": state[f"roi_head.bbox_head.{stage_prefix}.fc_cls.weight"],
        "cls_b": state[f"roi_head.bbox_head.{stage_prefix}.fc_cls.bias"],
        "mask_w": state[f"roi_head.mask_head.{stage_prefix}.conv_logits.weight"],
        "mask_b": state[f"roi_head.mask_head.{stage_prefix}.conv_logits.bias"],
    }


@pytest.mark.parametrize("rider_from", [None, "person"])
def test_cli_maps_official_rows_by_name(official, tmp_path, rider_from):
    src, dst = tmp_path / "queryinst_coco.pth", tmp_path / "cityscapes_init.pth"
    torch.save({"meta": {"mmdet_version": "2.16.0"}, "state_dict": official}, src)
    extra = ["--class-source", f"rider={rider_from}"] if rider_from else []
    argv = [str(src), str(dst), "--to-cityscapes", *extra, "--config-file", CITYSCAPES_CONFIG]
    assert convert_queryinst.main([*argv, *SMALL_OPTS]) == 0
    model = _cityscapes_model()
    QSCheckpointer(model).load(str(dst))  # strict: every key, every shape
    ours = model.state_dict()
    for t in range(SMALL["num_stages"]):
        theirs, mine = _class_rows(official, t), _class_rows(ours, t)
        for i, name in enumerate(CITYSCAPES):
            source = rider_from if name == "rider" else name
            if source is None:
                continue
            j = MMDET_COCO_CLASSES.index(source)
            for key in theirs:
                torch.testing.assert_close(mine[key][i], theirs[key][j], msg=f"{t} {name} {key}")
        if rider_from is None:  # the Cityscapes model's own initialisation
            torch.testing.assert_close(mine["cls_b"][1], torch.tensor(PRIOR_BIAS))
            assert not any(torch.equal(mine["cls_w"][1], row) for row in theirs["cls_w"])
    torch.testing.assert_close(
        ours["backbone.fpn_output5.weight"], official["neck.fpn_convs.3.conv.weight"]
    )


def test_cli_maps_a_queryseg_coco_checkpoint(official, tmp_path):
    cfg = get_cfg()
    merge_config(cfg, R50_1X, [*SMALL_OPTS, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    coco_model = META_ARCH_REGISTRY.get("QueryInst")(cfg)
    coco_state, report = convert_queryinst.convert_queryinst(official, coco_model.state_dict())
    src, dst = tmp_path / "model_final.pth", tmp_path / "cityscapes_init.pth"
    torch.save({"model": coco_state, "meta_architecture": "QueryInst"}, src)
    argv = [str(src), str(dst), "--to-cityscapes", "--config-file", CITYSCAPES_CONFIG]
    assert convert_queryinst.main([*argv, *SMALL_OPTS]) == 0
    model = _cityscapes_model()
    QSCheckpointer(model).load(str(dst))
    d2_coco = convert_queryinst.coco_thing_classes()  # QuerySeg's (Detectron2's) COCO order
    mine, theirs = _class_rows(model.state_dict(), 1), _class_rows(coco_state, 1)
    for name in ("person", "car", "bicycle"):
        i, j = CITYSCAPES.index(name), d2_coco.index(name)
        torch.testing.assert_close(mine["mask_w"][i], theirs["mask_w"][j])
        torch.testing.assert_close(mine["cls_b"][i], theirs["cls_b"][j])


def test_class_source_needs_to_cityscapes(official, tmp_path, capsys):
    src, dst = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save({"state_dict": official}, src)
    argv = [str(src), str(dst), "--class-source", "rider=person", "--config-file", R50_1X]
    assert convert_queryinst.main([*argv, *SMALL_OPTS]) == 1
    assert "--class-source needs --to-cityscapes" in capsys.readouterr().err
    assert not dst.exists()
