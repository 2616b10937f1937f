"""K-Net's matching adapter, its loss terms and its inference post-processing on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from knet.losses import (
    KNetFocalLabelsLoss,
    KNetMatcher,
    KNetSemanticSegLoss,
    knet_rank_targets,
    rank_loss,
)
from knet.postprocessing import instance_inference, panoptic_inference

from common.modeling.matcher import HungarianMatcher

LN2 = math.log(2)
NEG = 0.75 * 0.25 * LN2  # focal loss of a logit 0 (p = 1/2) on a negative: (1-a) p^2 (-log(1-p))
POS = 0.25 * 0.25 * LN2  # ... and on a positive: a (1-p)^2 (-log p)


def _masks(*rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# targets on a 2x2 map: thing (class 1), stuff (class 3), thing (class 0); T = 2, S = 2, N = 2
TARGET = {
    "labels": torch.tensor([1, 3, 0]),
    "masks": _masks([[1, 1], [0, 0]], [[0, 0], [1, 1]], [[1, 0], [1, 0]]),
    "image_size": (2, 2),
}


def _outputs(num_kernels: int) -> dict:
    """Kernel 0 predicts target 2's mask, kernel 1 target 0's (logits +-5); extra kernels are
    stuff kernels. The class logits favour the right thing class; the stuff columns of the thing
    kernels are made attractive to show they are ignored."""
    masks = torch.full((1, num_kernels, 2, 2), -5.0)
    masks[0, 0] = TARGET["masks"][2] * 10 - 5
    masks[0, 1] = TARGET["masks"][0] * 10 - 5
    logits = torch.zeros(1, num_kernels, 4)
    logits[0, 0, 0] = logits[0, 1, 1] = 3.0
    logits[0, :2, 2:] = 10.0
    return {"pred_masks": masks, "pred_logits": logits}


def _matcher(with_stuff: bool, with_class: bool = True) -> KNetMatcher:
    costs = [("dice_sq", 4.0), ("mask_agreement", 1.0)]
    if with_class:
        costs = [("focal_class", 2.0), *costs]
    return KNetMatcher(HungarianMatcher(costs), num_proposals=2, num_thing_classes=2,
                       with_stuff=with_stuff)  # fmt: skip


def test_matcher_things_then_fixed_stuff_pairs():
    ((src, tgt),) = _matcher(with_stuff=True)(_outputs(4), [TARGET])
    # kernel 0 <-> target 2, kernel 1 <-> target 0, stuff class 3 -> kernel 2 + (3 - 2) = 3
    assert src.tolist() == [0, 1, 3] and tgt.tolist() == [2, 0, 1]
    ((src, tgt),) = _matcher(with_stuff=False)(_outputs(2), [TARGET])
    assert src.tolist() == [0, 1] and tgt.tolist() == [2, 0]
    ((src, tgt),) = _matcher(with_stuff=True, with_class=False)(  # stage 1: on stage-0 masks
        {"pred_masks": _outputs(2)["pred_masks"]}, [TARGET]
    )
    assert src.tolist() == [0, 1, 3] and tgt.tolist() == [2, 0, 1]


def test_matcher_empty_targets():
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 2, 2)}
    ((src, tgt),) = _matcher(with_stuff=True)(_outputs(4), [empty])
    assert src.numel() == tgt.numel() == 0


def test_focal_labels_instance_by_hand():
    term = KNetFocalLabelsLoss(num_classes=2, num_proposals=2, num_thing_classes=2)
    logits = torch.zeros(1, 2, 2)  # p = 1/2 everywhere
    target = {"labels": torch.tensor([1])}
    out = term({"pred_logits": logits}, [target], [(torch.tensor([0]), torch.tensor([0]))], 1.0)
    # kernel 0: class 1 positive, class 0 negative; kernel 1: two negatives
    assert out["loss_cls"].item() == pytest.approx(3 * NEG + POS, rel=1e-5)


def test_focal_labels_panoptic_weights_by_hand():
    term = KNetFocalLabelsLoss(num_classes=4, num_proposals=2, num_thing_classes=2)
    assert term.label_weights(2, torch.device("cpu")) is None
    assert term.label_weights(4, torch.device("cpu")).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
    ]
    logits = torch.zeros(1, 4, 4)
    target = {"labels": torch.tensor([1, 2])}  # thing class 1 -> kernel 0, stuff class 2 -> 2
    indices = [(torch.tensor([0, 2]), torch.tensor([0, 1]))]
    out = term({"pred_logits": logits}, [target], indices, 2.0)
    # thing rows: 3 negatives + 1 positive; stuff row 2: its positive; absent stuff row 3: one
    # negative (its own column); all divided by the 2 matched kernels
    assert out["loss_cls"].item() == pytest.approx((3 * NEG + POS + POS + NEG) / 2, rel=1e-5)


def test_semantic_seg_targets_by_hand():
    term = KNetSemanticSegLoss(num_classes=4, num_thing_classes=2)
    indices = [(torch.tensor([0, 1]), torch.tensor([2, 0]))]
    labels = term.dense_labels([TARGET], indices, (2, 2), torch.device("cpu"))
    # stuff (class 3) on the bottom row first; then matched things in kernel order: target 2
    # (class 0, left column), then target 0 (class 1, top row) on top
    assert labels.tolist() == [[[1, 1], [0, 3]]]
    seg = torch.zeros(1, 4, 2, 2)
    out = term({"pred_seg": seg}, [TARGET], indices, 1.0)
    # 4 foreground pixels: each 1 positive + 3 negatives; divided by the 4 foreground pixels
    assert out["loss_seg"].item() == pytest.approx(POS + 3 * NEG, rel=1e-5)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 2, 2)}
    out = term({"pred_seg": seg}, [empty], [(torch.zeros(0).long(), torch.zeros(0).long())], 1.0)
    assert out["loss_seg"].item() == pytest.approx(16 * NEG, rel=1e-5)  # all background / 1


def test_panoptic_merge_by_hand():
    """2 thing kernels and 1 stuff kernel (T = 1, C = 2) on a 1x4 image:
    scores: thing 0 -> 0.9, thing 1 -> 0.2 (< 0.3: dropped), stuff -> 0.5 (its own column);
    masks: thing 0 (.9 .9 .1 .1), thing 1 (.9 .9 .9 .1), stuff (.6 .6 .6 .4);
    score x mask argmax: thing 0, thing 0, stuff, stuff. Thing 0 keeps 2 of its 2 pixels,
    the stuff kernel 2 of its 3 (>= 0.6)."""
    cls = torch.tensor([[_logit(0.9), -9.0], [_logit(0.2), -9.0], [-9.0, 0.0]])
    probs = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.9, 0.1], [0.6, 0.6, 0.6, 0.4]])
    masks = torch.log(probs / (1 - probs))[:, None, :]
    size = (1, 4)
    pan, info = panoptic_inference(cls, masks, num_proposals=2, num_thing_classes=1,
                                   padded_size=size, image_size=size, output_size=size)  # fmt: skip
    assert pan.tolist() == [[1, 1, 2, 2]]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [
        (1, 0, True),
        (2, 1, False),
    ]
    # a stricter overlap threshold drops the stuff segment (2/3 < 0.7): its pixels stay void
    pan, info = panoptic_inference(cls, masks, num_proposals=2, num_thing_classes=1,
                                   padded_size=size, image_size=size, output_size=size,
                                   overlap_thr=0.7)  # fmt: skip
    assert pan.tolist() == [[1, 1, 0, 0]] and len(info) == 1


def test_instance_inference_top_k_by_hand():
    # 2 kernels x 3 classes; top-3 scores: (k1, c2) .9, (k0, c0) .8, (k1, c0) .7
    probs = torch.tensor([[0.8, 0.1, 0.2], [0.7, 0.3, 0.9]])
    masks = torch.tensor([[[5.0, -5.0], [-5.0, -5.0]], [[-5.0, -5.0], [5.0, 5.0]]])
    size = (2, 2)
    inst = instance_inference(torch.log(probs / (1 - probs)), masks, padded_size=size,
                              image_size=size, output_size=(4, 4), max_per_image=3)  # fmt: skip
    assert inst.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert inst.pred_classes.tolist() == [2, 0, 0]
    assert inst.pred_masks.shape == (3, 4, 4)
    # kernel 1 = bottom row -> rows 2-3 of the 4x4 output; kernel 0 = top-left pixel
    assert inst.pred_boxes.tensor.tolist() == [[0, 2, 4, 4], [0, 0, 2, 2], [0, 2, 4, 4]]


def test_knet_rank_targets_and_loss():
    masks = torch.zeros(3, 2, 2)
    masks[0, 0, :] = 1.0
    masks[2, 0, 0] = 0.3  # overlaps kernel 0 at (0, 0): the later kernel wins
    masks[1, 1, 1] = 1.0
    tgt = knet_rank_targets(masks, ignore_index=255)
    assert tgt.tolist() == [[2, 0], [255, 1]]
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    loss = rank_loss(logits, tgt[None])
    logp = logits.log_softmax(1)[0]
    manual = -(logp[2, 0, 0] + logp[0, 0, 1] + logp[1, 1, 1]) / 4  # mean over ALL pixels
    assert torch.allclose(loss, manual)
    assert torch.allclose(rank_loss(logits, tgt[None], avg_non_ignore=True), manual * 4 / 3)
    assert torch.autograd.gradcheck(lambda x: rank_loss(x, tgt[None]), (logits,))
    none = knet_rank_targets(torch.zeros(0, 2, 2))
    assert (none == 255).all() and none.shape == (2, 2)
    all_ignored = rank_loss(torch.zeros(1, 2, 2, 2, requires_grad=True), torch.full((1, 2, 2), 255))
    assert all_ignored.item() == 0.0 and all_ignored.grad_fn is not None
