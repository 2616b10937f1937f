"""Post-processing: instance (scores x mask scores, top-k, no NMS, boxes from masks), semantic
and panoptic (Mask2Former merge)."""

from __future__ import annotations

import torch
from detectron2.structures import BitMasks
from fastinst.inference import (
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    semantic_inference,
)


def test_masks_to_boxes_matches_detectron2():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 13, 17, generator=g) > 0.97
    masks[3] = False
    masks[5] = False
    masks[5, 4, 6] = True
    assert torch.equal(masks_to_boxes(masks), BitMasks(masks).get_bounding_boxes().tensor)
    assert masks_to_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


def test_instance_inference_scores_topk_without_nms():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0]])  # C = 2
    masks = torch.full((3, 8, 8), -6.0)
    masks[0, 2:5, 1:4] = 6.0
    masks[1] = masks[0]  # a duplicate of query 0's mask: kept (no NMS)
    inst = instance_inference(logits, masks, topk=3)
    probs = logits.softmax(-1)[:, :-1]
    top, idx = probs.flatten().topk(3)
    assert len(inst) == 3 and inst.image_size == (8, 8)
    order = inst.scores.argsort(descending=True)
    for rank, k in enumerate(order.tolist()):
        q, c = divmod(int(idx[rank]), 2)
        mask_prob = masks[q].sigmoid()
        binary = mask_prob > 0.5
        mask_score = (mask_prob * binary).sum() / (binary.sum() + 1e-6)
        assert int(inst.pred_classes[k]) == c
        assert torch.isclose(inst.scores[k], top[rank] * mask_score)
        assert torch.equal(inst.pred_masks[k], binary)
    assert inst.pred_masks.dtype == torch.bool
    full = [b for b, m in zip(inst.pred_boxes.tensor, inst.pred_masks) if m.any()]
    assert all(b.tolist() == [1.0, 2.0, 4.0, 5.0] for b in full)
    # panoptic models keep thing classes only; top-k is clipped to Q x C
    assert set(
        instance_inference(logits, masks, topk=6, keep_classes={1}).pred_classes.tolist()
    ) == {1}
    assert len(instance_inference(logits, masks, topk=100)) == 6


def test_semantic_inference():
    logits = torch.randn(4, 4)
    masks = torch.randn(4, 5, 6)
    sem = semantic_inference(logits, masks)
    expected = torch.einsum("qc,qhw->chw", logits.softmax(-1)[:, :-1], masks.sigmoid())
    assert sem.shape == (3, 5, 6) and torch.allclose(sem, expected)


def test_panoptic_inference_merges_stuff_and_drops_occluded():
    # classes: 0 = thing, 1 = stuff, 2 = no-object column index 2
    logits = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 9.0, 0], [9.0, 0, 0], [0, 0, 9.0]])
    masks = torch.full((5, 6, 6), -9.0)
    masks[0, :3, :3] = 9.0  # thing
    masks[1, 3:, :] = 9.0  # stuff, two queries of the same class: one segment
    masks[2, :3, 3:] = 9.0
    masks[3, :3, :3] = 9.0  # same thing mask again: loses every pixel to query 0 -> dropped
    masks[3, 0, 0] = 10.0  # (keeps one pixel, far below the overlap threshold)
    masks[4] = 9.0  # no-object: ignored
    pan, info = panoptic_inference(
        logits, masks, object_mask_threshold=0.8, overlap_threshold=0.8, thing_ids={0}
    )
    assert pan.shape == (6, 6) and pan.dtype == torch.int32
    assert [(s["category_id"], s["isthing"]) for s in info] == [(0, True), (1, False)]
    thing_id, stuff_id = info[0]["id"], info[1]["id"]
    assert (pan[1:3, :3] == thing_id).all() and (pan[3:] == stuff_id).all()
    assert (pan[:3, 3:] == stuff_id).all()
    empty, none = panoptic_inference(
        logits, masks, object_mask_threshold=0.9999, overlap_threshold=0.8, thing_ids={0}
    )
    assert none == [] and not empty.any()
