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
    with pytest.raises(ValueError, match="NUM_CLASSES=80 but dataset 'shapes_train' has 5"):
        build_model(cfg)


def test_wrong_image_layout_is_reported():
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_CFG), SMALL)
    model = build_model(cfg).eval()
    batch = make_batch("instance", [1], 5, with_targets=False)
    batch[0]["image"] = batch[0]["image"][:1]
    with pytest.raises(ValueError, match=r"expects images \[3, H, W\]"):
        model(batch)


def test_masks_are_resized_from_the_stride4_map_and_cropped_to_boxes():
    from detectron2.structures import Boxes, Instances

    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_CFG), SMALL)
    model = build_model(cfg)
    det = Instances((32, 48))
    det.pred_boxes = Boxes(torch.tensor([[16.0, 8.0, 28.0, 16.0]]))
    det.scores = torch.tensor([0.9])
    det.pred_classes = torch.tensor([2])
    log_prob = torch.full((1, 8, 12), -10.0)  # stride-4 grid of a 32 x 48 input
    log_prob[0, 2:4, 4:7] = 0.0  # cells covering input rows 8..15, cols 16..27
    out = model._postprocess(det, log_prob, (32, 48), (64, 96))
    assert out.pred_masks.shape == (1, 64, 96)
    # inside (output = 2 x input; interpolating the step to -10 trims ~half a cell per side)
    assert out.pred_masks[0, 20:28, 37:52].all()
    assert not out.pred_masks[0, :14].any() and not out.pred_masks[0, 34:].any()
    assert not out.pred_masks[0, :, :30].any() and not out.pred_masks[0, :, 58:].any()
    torch.testing.assert_close(out.pred_boxes.tensor, torch.tensor([[32.0, 16.0, 56.0, 32.0]]))
    # box crop: box 16..28 x 8..16 -> cells 4..7 x 2..4, padded by 2 cells
    full = torch.zeros(1, 8, 12)
    cropped = model._crop_to_boxes(full, det.pred_boxes.tensor)
    inside = torch.zeros(8, 12, dtype=torch.bool)
    inside[0:7, 2:10] = True
    assert ((cropped[0] == 0) == inside).all()
