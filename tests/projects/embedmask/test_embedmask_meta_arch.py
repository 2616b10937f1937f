"""End-to-end EmbedMask checks (shared mixin), every YAML merging/building, and bad-input errors."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from meta_arch_mixin import REPO, MetaArchTestMixin, make_batch

import common.data  # noqa: F401  (registers shapes_*: thing_classes for the class-count check)
from common.engine import get_cfg, merge_config

SHAPES_CFG = "projects/embedmask/configs/shapes/embedmask_R18_shapes.yaml"
CONFIGS = sorted(
    glob.glob(os.path.join(REPO, "projects/embedmask/configs/**/*.yaml"), recursive=True)
)
#: COCO models too heavy to build in a unit test on a shared CPU (merge-only).
MERGE_ONLY = ("R101",)
SMALL = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.FCOS.NUM_CONVS", "1",
         "MODEL.EMBEDMASK.MASK_NUM_CONVS", "1"]  # fmt: skip

LOSS_KEYS = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"}


class TestEmbedMaskInstance(MetaArchTestMixin):
    config_file = SHAPES_CFG
    task = "instance"
    overrides = SMALL
    expected_loss_keys = LOSS_KEYS


class TestEmbedMaskPaperVariant(MetaArchTestMixin):
    """The paper/v1 training variant: mean of IoU > 0.5 positives, smooth loss, box-padded crop,
    scalar margin; masks not box-cropped at inference."""

    config_file = SHAPES_CFG
    task = "instance"
    overrides = [
        *SMALL,
        "MODEL.EMBEDMASK.POSITIVE_SAMPLING", "iou_mean",
        "MODEL.EMBEDMASK.LOSS_SMOOTH_ALPHA", "0.1",
        "MODEL.EMBEDMASK.BOX_PADDING", "0.1",
        "MODEL.EMBEDMASK.MARGIN_PER_DIM", "False",
        "MODEL.EMBEDMASK.MASK_BOX_CROP", "False",
    ]  # fmt: skip
    expected_loss_keys = LOSS_KEYS | {"loss_smooth"}


def test_all_positives_sampling_trains():
    cfg = get_cfg()
    merge_config(
        cfg,
        os.path.join(REPO, SHAPES_CFG),
        [*SMALL, "MODEL.EMBEDMASK.POSITIVE_SAMPLING", "all", "MODEL.EMBEDMASK.MAX_PROPOSALS", "3"],
    )
    model = build_model(cfg)
    losses = model(make_batch("instance", [3, 1], 5))
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(c, REPO) for c in CONFIGS])
def test_every_yaml_merges_and_builds(path):
    cfg = get_cfg()
    merge_config(cfg, path, ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.META_ARCHITECTURE == "EmbedMask"
    if any(tag in os.path.basename(path) for tag in MERGE_ONLY):
        return
    model = build_model(cfg)
    assert type(model).__name__ == "EmbedMask"
    assert model.mask_stride == 4


def test_num_classes_mismatch_is_reported_at_build():
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_CFG), [*SMALL, "MODEL.FCOS.NUM_CLASSES", "80"])
    with pytest.raises(ValueError, match="NUM_CLASSES=80 but shapes_train has 5"):
        build_model(cfg)


def test_wrong_image_layout_is_reported():
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_CFG), SMALL)
    model = build_model(cfg).eval()
    batch = make_batch("instance", [1], 5, with_targets=False)
    batch[0]["image"] = batch[0]["image"][:1]
    with pytest.raises(ValueError, match=r"expects images \[3, H, W\]"):
        model(batch)
