"""The YouTube-VIS evaluator: tube IoU, video AP/AR on hand-made tubes, identity switches."""

from __future__ import annotations

import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances

from common.data.shapes_vis import register_shapes_vis
from common.data.ytvis_evaluation import (
    YTVISEvaluator,
    count_id_switches,
    evaluate_tracks,
    tube_iou,
)

H = W = 16


def _rle(x0: int) -> dict:
    """A 2x5 = 10 px rectangle at column x0."""
    m = np.zeros((H, W), np.uint8)
    m[0:2, x0 : x0 + 5] = 1
    return mask_util.encode(np.asfortranarray(m))


A, B, C = _rle(0), _rle(8), _rle(5)  # A and B disjoint; C overlaps neither fully


def _track(segs, cat=1, score=None, video=1):
    t = {"video_id": video, "category_id": cat, "segmentations": list(segs)}
    if score is not None:
        t["score"] = score
    return t


def test_tube_iou_sums_over_frames():
    assert tube_iou([A, A, A], [A, A, A]) == 1.0
    assert tube_iou([A, A, None], [A, A, A]) == pytest.approx(20 / 30)
    assert tube_iou([A, None], [None, A]) == 0.0
    assert tube_iou([None, None], [None, None]) == 0.0


def test_perfect_tube_scores_100():
    gt = [_track([A, A, A])]
    res = evaluate_tracks(gt, [_track([A, A, A], score=0.9)], [1], [1])
    assert res["AP"] == pytest.approx(100) and res["AR1"] == pytest.approx(100)
    assert res["AP50"] == res["AP75"] == pytest.approx(100)


def test_one_missed_frame():
    # IoU 20/30 = 0.667 >= 0.50, 0.55, 0.60, 0.65 but not 0.70 ... 0.95: 4 of 10 thresholds
    gt = [_track([A, A, A])]
    res = evaluate_tracks(gt, [_track([A, A, None], score=0.9)], [1], [1])
    assert res["AP"] == pytest.approx(40)
    assert res["AP50"] == pytest.approx(100) and res["AP75"] == pytest.approx(0)
    assert res["AR10"] == pytest.approx(40)


def test_swapped_identities():
    # two tracks that swap identities in the last of 5 frames: each prediction covers its ground
    # truth in 4 frames and the other one in the 5th: IoU = 40 / (40 + 20) = 0.667 -> AP 40;
    # swapping at frame 2 of 4 instead: IoU = 20 / 60 < 0.5 -> AP 0
    gt = [_track([A] * 5), _track([B] * 5)]
    dts = [_track([A] * 4 + [B], score=0.9), _track([B] * 4 + [A], score=0.8)]
    res = evaluate_tracks(gt, dts, [1], [1])
    assert res["AP"] == pytest.approx(40) and res["AP50"] == pytest.approx(100)
    assert count_id_switches(gt, dts) == (2, 10)
    gt4 = [_track([A] * 4), _track([B] * 4)]
    early = [_track([A, A, B, B], score=0.9), _track([B, B, A, A], score=0.8)]
    assert evaluate_tracks(gt4, early, [1], [1])["AP"] == pytest.approx(0)
    assert count_id_switches(gt4, [_track([A] * 4, score=0.9)]) == (0, 4)


def test_false_positive_ranked_first():
    # a higher-scored false positive halves precision at every recall: AP 50; AR1 sees only it
    gt = [_track([A, A])]
    dts = [_track([A, A], score=0.5), _track([C, None], score=0.9)]
    assert tube_iou([C, None], [A, A]) < 0.5
    res = evaluate_tracks(gt, dts, [1], [1])
    assert res["AP"] == pytest.approx(50)
    assert res["AR1"] == pytest.approx(0) and res["AR10"] == pytest.approx(100)
    # another category never matches
    res = evaluate_tracks(gt, [_track([A, A], cat=2, score=0.9)], [1], [1, 2])
    assert res["AP"] == pytest.approx(0)
    assert math.isnan(res["APm"])  # no medium tracks


def _frames_from_json(anns: list[dict], length: int, h: int, w: int) -> list[Instances]:
    frames = []
    for f in range(length):
        inst = Instances((h, w))
        present = [a for a in anns if a["segmentations"][f] is not None]
        masks = [mask_util.decode(a["segmentations"][f]) for a in present]
        inst.pred_masks = torch.as_tensor(np.stack(masks) if masks else np.zeros((0, h, w)))
        inst.pred_masks = inst.pred_masks.bool()
        inst.scores = torch.ones(len(present))
        id_map = {1: 0, 2: 1, 4: 2, 5: 3, 7: 4}
        inst.pred_classes = torch.tensor([id_map[a["category_id"]] for a in present])
        inst.track_ids = torch.tensor([a["id"] for a in present])
        frames.append(inst)
    return frames


def test_ground_truth_as_predictions_gives_100(tmp_path):
    register_shapes_vis(
        root=str(tmp_path), image_size=48, num_train=1, num_val=6, num_frames=5, prefix="svis_ev"
    )
    DatasetCatalog.get("svis_ev_val")
    meta = MetadataCatalog.get("svis_ev_val")
    with open(meta.json_file) as f:
        data = json.load(f)
    ev = YTVISEvaluator("svis_ev_val", output_dir=str(tmp_path / "out"), distributed=False)
    ev.reset()
    for v in data["videos"]:
        anns = [a for a in data["annotations"] if a["video_id"] == v["id"]]
        frames = _frames_from_json(anns, v["length"], v["height"], v["width"])
        ev.process([{"video_id": v["id"]}], [{"frames": frames}])
    res = ev.evaluate()["video_segm"]
    assert res["AP"] == pytest.approx(100) and res["AR10"] == pytest.approx(100)
    assert res["IDSW"] == 0 and res["IDSW_frames"] > 0
    assert (tmp_path / "out" / "results.json").exists()
