"""QueryInstVIS: the association loss and tracker by hand, a clip through the model, and
train_net.py training 3 iterations and evaluating on a tiny `shapes_vis`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.structures import BitMasks, Instances
from queryinst.vis import OnlineTracker, QueryInstVIS, association_loss

from common.engine import get_cfg, merge_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG = "projects/queryinst/configs/shapes/queryinst_vis_R18_FPN_shapes_vis.yaml"


def test_association_loss_by_hand():
    cur = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    prev = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    loss, n = association_loss(cur, torch.tensor([5, 9]), prev, torch.tensor([5, 6]))
    # instance 5 -> logits [0, 2, 0], target 1; instance 9 is new -> logits [0, 0, 3], target 0
    expected = (math.log(2 + math.e**2) - 2) + math.log(2 + math.e**3)
    assert n == 2 and loss.item() == pytest.approx(expected, rel=1e-6)
    empty, n = association_loss(cur[:0], torch.zeros(0, dtype=torch.long), prev, prev[:, 0])
    assert n == 0 and empty.item() == 0.0
    # nothing matched in the previous frame: every instance is new
    loss, n = association_loss(cur, torch.tensor([5, 9]), prev[:0], torch.zeros(0).long())
    assert n == 2 and loss.item() == pytest.approx(0.0)


def test_tracker_follows_embeddings_and_starts_new_tracks():
    tracker = OnlineTracker(det_score_weight=1.0, iou_weight=2.0, label_weight=10.0)
    e = torch.eye(3) * 6
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]])
    one = torch.ones(2)
    ids0 = tracker.update(e[:2], boxes[:2], torch.tensor([0, 1]), one)
    assert ids0.tolist() == [1, 2]
    # the same two objects, listed in the other order and moved a little
    ids1 = tracker.update(e[[1, 0]], boxes[[1, 0]] + 2, torch.tensor([1, 0]), one)
    assert ids1.tolist() == [2, 1]
    # object 1 is gone; a third, unlike both, appears
    ids2 = tracker.update(e[[1, 2]], boxes[[1, 2]], torch.tensor([1, 2]), one)
    assert ids2.tolist() == [2, 3]
    # object 1 comes back: its track is still in memory
    assert tracker.update(e[:1], boxes[:1], torch.tensor([0]), one[:1]).tolist() == [1]


def _cfg(*opts):
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, CONFIG), list(opts))
    return cfg


def _clip(num_frames: int, size: int = 64) -> dict:
    torch.manual_seed(0)
    image = (torch.rand(3, size, size) * 255).to(torch.uint8)
    image[:, 10:30, 12:34] = torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None]
    frames, instances = [], []
    for t in range(num_frames):
        frames.append(image.roll(2 * t, dims=2))
        inst = Instances((size, size))
        m = torch.zeros(1, size, size, dtype=torch.bool)
        m[0, 10:30, 12 + 2 * t : 34 + 2 * t] = True
        inst.gt_masks = BitMasks(m)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.tensor([0])
        inst.gt_ids = torch.tensor([7])
        instances.append(inst)
    return {"images": frames, "instances": instances, "height": size, "width": size}


def test_training_step_has_track_loss():
    from detectron2.modeling import build_model

    model = build_model(_cfg())
    assert isinstance(model, QueryInstVIS)
    model.train()
    losses = model([_clip(3), _clip(3)])
    assert "loss_track" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.track_head.fcs[-1].weight.grad.abs().sum() > 0


def test_clip_returns_consistent_track_ids():
    from detectron2.modeling import build_model

    # every query is a detection (the untrained scores are ~0.01: threshold 0 and no score cue);
    # a static clip: the carried queries must meet their own tracks again
    model = build_model(
        _cfg(
            "MODEL.QUERYINST.VIS.SCORE_THRESH",
            "0.0",
            "MODEL.QUERYINST.VIS.MATCH_DET_SCORE_WEIGHT",
            "0.0",
        )
    )
    model.eval()
    clip = _clip(1)
    video = {"images": clip["images"] * 4, "height": 64, "width": 64}
    frames = model([video])[0]["frames"]
    assert len(frames) == 4
    first = set(frames[0].track_ids.tolist())
    assert len(first) == len(frames[0]) == model.rpn_head.num_proposals
    for inst in frames:
        ids = inst.track_ids.tolist()
        assert len(set(ids)) == len(ids) and min(ids) >= 1  # distinct within a frame
        assert inst.pred_masks.shape[1:] == (64, 64)
        assert set(ids) == first  # no track lost or restarted on identical frames
    again = model([video])[0]["frames"]
    assert all(torch.equal(a.track_ids, b.track_ids) for a, b in zip(frames, again))


def test_train_net_trains_and_evaluates_video(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    cmd = [
        sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG,
        "DATASETS.SHAPES_VIS.NUM_TRAIN", "4", "DATASETS.SHAPES_VIS.NUM_VAL", "2",
        "DATASETS.SHAPES_VIS.NUM_FRAMES", "4", "DATASETS.SHAPES_VIS.IMAGE_SIZE", "48",
        "INPUT.MIN_SIZE_TRAIN", "(48,)", "INPUT.MIN_SIZE_TEST", "48", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (out / "model_final.pth").exists()
    assert "copypaste: AP,AP50,AP75,APs,APm,APl,AR1,AR10,AR100,IDSW" in log
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    assert any("loss_track" in r for r in records)
    assert (out / "inference" / "results.json").exists()
