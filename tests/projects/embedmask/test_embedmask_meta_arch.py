"""End-to-end EmbedMask checks (shared mixin), every YAML merging/building, and bad-input errors."""

from __future__ import annotations

import glob
import math
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


class TestEmbedMaskOfficialConventions(MetaArchTestMixin):
    """The config defaults the shapes config overrides: maskrcnn-benchmark boxes, FCOS's
    smoothed GIoU, v2's padded-grid mask resize."""

    config_file = SHAPES_CFG
    task = "instance"
    overrides = [
        *SMALL,
        "MODEL.FCOS.BOX_CONVENTION", "maskrcnn-benchmark",
        "MODEL.FCOS.IOU_LOSS_SMOOTH", "1.0",
        "MODEL.EMBEDMASK.MASK_RESIZE", "padded",
    ]  # fmt: skip
    expected_loss_keys = LOSS_KEYS


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


def test_num_classes_mismatch_is_reported_at_config_finalisation():
    cfg = get_cfg()
    with pytest.raises(ValueError, match="NUM_CLASSES=80 but dataset 'shapes_train' has 5"):
        merge_config(cfg, os.path.join(REPO, SHAPES_CFG), [*SMALL, "MODEL.FCOS.NUM_CLASSES", "80"])


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


def test_box_crop_is_the_official_half_open_window():
    """v2's op fills cells [x0, x1) x [y0, y1), x0 = max(int(x1_box / 4) - 2, 0),
    x1 = min(int(x2_box / 4) + 2, W')."""
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_CFG), SMALL)
    model = build_model(cfg)
    boxes = torch.tensor([[16.0, 8.0, 28.0, 16.0], [40.0, 20.0, 47.0, 31.0]])
    cropped = model._crop_to_boxes(torch.zeros(2, 8, 12), boxes)
    inside = torch.zeros(2, 8, 12, dtype=torch.bool)
    inside[0, 0:6, 2:9] = True  # x: 16/4 - 2 = 2 .. 28/4 + 2 = 9; y: max(2 - 2, 0) .. 4 + 2 = 6
    inside[1, 3:8, 8:12] = True  # x: 10 - 2 = 8 .. min(11 + 2, 12); y: 5 - 2 = 3 .. min(9, 8)
    assert torch.equal(cropped == 0, inside)
    assert (cropped[~inside] == -10).all()


def test_padded_mask_resize_is_v2s_evaluator():
    """MASK_RESIZE padded: the padded grid to ceil(8 * 4 * 50 / 30) x ceil(12 * 4 * 70 / 45) =
    54 x 75, bilinear, then the top-left 50 x 70; boxes scaled, then x2, y2 + 1, not clipped."""
    from detectron2.structures import Boxes, Instances
    from torch.nn import functional as F

    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_CFG), SMALL)
    cfg.MODEL.EMBEDMASK.MASK_RESIZE = "padded"
    cfg.MODEL.FCOS.BOX_CONVENTION = "maskrcnn-benchmark"
    model = build_model(cfg)
    det = Instances((30, 45))
    det.pred_boxes = Boxes(torch.tensor([[16.0, 8.0, 44.0, 29.0]]))
    det.scores, det.pred_classes = torch.tensor([0.9]), torch.tensor([2])
    log_prob = torch.randn(1, 8, 12, generator=torch.Generator().manual_seed(0))
    out = model._postprocess(det, log_prob, (30, 45), (50, 70))
    ref = F.interpolate(log_prob[None], size=(54, 75), mode="bilinear", align_corners=False)
    assert torch.equal(out.pred_masks, ref[0, :, :50, :70] > math.log(0.53))
    rx, ry = 70 / 45, 50 / 30
    expected = torch.tensor([[16 * rx, 8 * ry, 44 * rx + 1, 29 * ry + 1]])
    torch.testing.assert_close(out.pred_boxes.tensor, expected)
    model.mask_resize = "exact"  # the exact mapping differs (6.67 vs 6.75 output px per cell)
    assert not torch.equal(model._postprocess(det, log_prob, (30, 45), (50, 70)).pred_masks,
                           out.pred_masks)  # fmt: skip


def test_float64_inference_runs():
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_CFG), [*SMALL, "MODEL.FCOS.INFERENCE_TH", "0.0"])
    for convention in ("maskrcnn-benchmark", "detectron2"):
        cfg.MODEL.FCOS.BOX_CONVENTION = convention
        model = build_model(cfg).double().eval()
        batch = make_batch("instance", [2, 1], 5, with_targets=False)  # GN: > 1 value on P7
        with torch.no_grad():
            out = model(batch)[0]["instances"]
        assert len(out) > 0 and out.scores.dtype == torch.float64
