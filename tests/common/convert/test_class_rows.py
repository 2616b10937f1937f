"""Class rows mapped by name (common.convert.core.class_row_sources / remap_class_rows): COCO's
80 rows land on Cityscapes' 8 by name, rider (no COCO class) takes the target model's initial
row or the row named for it, and bad names are refused."""

from __future__ import annotations

import pytest
import torch

from common.convert.core import CheckpointError, class_row_sources, remap_class_rows
from common.convert.rules import CITYSCAPES_FROM_COCO, MMDET_COCO_CLASSES

CITYSCAPES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


def test_cityscapes_rows_come_from_their_coco_namesakes():
    rows = class_row_sources(MMDET_COCO_CLASSES, CITYSCAPES, "test", CITYSCAPES_FROM_COCO)
    # mmdet's COCO order: person 0, bicycle 1, car 2, motorcycle 3, bus 5, train 6, truck 7
    assert rows == [0, None, 2, 7, 5, 6, 3, 1]
    assert CITYSCAPES_FROM_COCO == {"rider": None}
    with_person = class_row_sources(MMDET_COCO_CLASSES, CITYSCAPES, "test", {"rider": "person"})
    assert with_person == [0, 0, 2, 7, 5, 6, 3, 1]


def test_remap_picks_rows_and_fills_the_unmapped_from_the_initialisation():
    src = {
        "head.fc_cls.weight": torch.arange(80.0)[:, None].expand(80, 3).clone(),
        "head.fc_cls.bias": torch.arange(80.0),
        "head.other": torch.ones(2),
    }
    init = {
        "head.fc_cls.weight": torch.full((8, 3), -1.0),
        "head.fc_cls.bias": torch.full((8,), -4.6),
    }
    rows = class_row_sources(MMDET_COCO_CLASSES, CITYSCAPES, "test", CITYSCAPES_FROM_COCO)
    out = remap_class_rows(src, r"head\.fc_cls\.(weight|bias)", rows, init)
    # person, rider (initialisation), car, truck, bus, train, motorcycle, bicycle
    torch.testing.assert_close(out["head.fc_cls.bias"], torch.tensor([0, -4.6, 2, 7, 5, 6, 3, 1]))
    expected_weight = torch.tensor([0.0, -1, 2, 7, 5, 6, 3, 1])[:, None].expand(8, 3)
    torch.testing.assert_close(out["head.fc_cls.weight"], expected_weight)
    assert torch.equal(out["head.other"], src["head.other"])
    for k in ("head.fc_cls.weight", "head.fc_cls.bias"):
        assert out[k].shape[0] == 8 and src[k].shape[0] == 80  # the source is left alone


def test_bad_names_and_missing_initialisation_are_refused():
    with pytest.raises(CheckpointError, match="sources absent.*'rider': 'pedestrian'"):
        class_row_sources(MMDET_COCO_CLASSES, CITYSCAPES, "t", {"rider": "pedestrian"})
    with pytest.raises(CheckpointError, match="targets absent.*'dog'"):
        class_row_sources(MMDET_COCO_CLASSES, CITYSCAPES, "t", {"dog": "cat"})
    with pytest.raises(CheckpointError, match="repeated targets.*'car'"):
        class_row_sources(MMDET_COCO_CLASSES, ("car", "car"), "t")
    rows = class_row_sources(MMDET_COCO_CLASSES, CITYSCAPES, "t", CITYSCAPES_FROM_COCO)
    with pytest.raises(CheckpointError, match=r"rows \[1\] have no source row"):
        remap_class_rows({"cls.bias": torch.zeros(80)}, r"cls\.bias", rows)
    with pytest.raises(CheckpointError, match="no class-row key matches"):
        remap_class_rows({"cls.bias": torch.zeros(80)}, r"logits\.bias", rows)
