"""FCOS target assignment on a constructed scene, against hand-computed assignments."""

from __future__ import annotations

import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from embedmask.fcos import FCOS, FCOSHead, centerness_targets, compute_locations

STRIDES = [8, 16, 32, 64, 128]
IMAGE = 128  # square input; levels are 16, 8, 4, 2, 1 cells wide


def _fcos(**kw) -> FCOS:
    """The hand-computed targets below use Detectron2's box convention unless told."""
    kw.setdefault("box_convention", "detectron2")
    head = FCOSHead(in_channels=8, num_classes=4, num_levels=5, num_convs=1, norm="")
    return FCOS(fcos_head=head, strides=STRIDES, sizes_of_interest=[64, 128, 256, 512], **kw)


def _scene() -> Instances:
    """A (class 1): 8..40 with its bottom-right quadrant cut out of the mask; C (class 2):
    0..48 around A (same centre, larger); B (class 3): 0..160, too big for P3."""
    inst = Instances((IMAGE, IMAGE))
    boxes = torch.tensor([[8, 8, 40, 40], [0, 0, 48, 48], [0, 0, 160, 160]], dtype=torch.float)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor([1, 2, 3])
    masks = torch.zeros(3, IMAGE, IMAGE, dtype=torch.bool)
    masks[0, 8:40, 8:40] = True
    masks[0, 24:40, 24:40] = False
    masks[1, 0:48, 0:48] = True
    masks[2] = True
    inst.gt_masks = BitMasks(masks)
    return inst


def _outputs(fcos: FCOS) -> dict:
    feats = [torch.zeros(1, 8, max(IMAGE // s, 1), max(IMAGE // s, 1)) for s in STRIDES]
    return fcos(feats)


def _index(level: int, x: float, y: float) -> int:
    """Flat location index of the cell of level ``level`` whose centre is (x, y)."""
    sizes = [max(IMAGE // s, 1) for s in STRIDES]
    s = STRIDES[level]
    offset = sum(n * n for n in sizes[:level])
    return offset + int((y - s // 2) // s) * sizes[level] + int((x - s // 2) // s)


def _expected(in_mask: bool) -> dict[int, tuple[int, int]]:
    """location index -> (gt index, class), derived by hand.

    A and C: centre (24, 24), P3 centre region (24 +- 1.5 * 8) = (12, 36) strictly, so P3 cells
    with centres x, y in {20, 28}; max(l, t, r, b) <= 28 (A) / 28 (C), inside P3's [-1, 64].
    Both are candidates there and A (area 1024 < 2304) wins, except at (28, 28) with sample-in-
    mask, which lies in A's cut-out quadrant and goes to C.
    B: centre (80, 80); P3 cells near it have max distance 84 > 64; P4 region (80 +- 24) holds
    the centres {72, 88}, max distance 88 in [64, 128]; P5 centres {48, 80, 112} have
    max distance >= 80 < 128. So B gets exactly the four P4 cells.
    """
    exp = {}
    for x in (20, 28):
        for y in (20, 28):
            exp[_index(0, x, y)] = (0, 1)
    if in_mask:
        exp[_index(0, 28, 28)] = (1, 2)
    for x in (72, 88):
        for y in (72, 88):
            exp[_index(1, x, y)] = (2, 3)
    return exp


@pytest.mark.parametrize("in_mask", [False, True])
def test_targets_match_hand_computed(in_mask):
    fcos = _fcos(sample_in_mask=in_mask)
    out = _outputs(fcos)
    tg = fcos.get_targets(out, [_scene()])
    labels, gt_inds, reg = tg["labels"][0], tg["gt_inds"][0], tg["reg_targets"][0]
    expected = _expected(in_mask)
    positives = {int(i): (int(gt_inds[i]), int(labels[i])) for i in torch.nonzero(gt_inds >= 0)}
    assert positives == expected
    assert (labels[gt_inds < 0] == 4).all()
    assert (reg[gt_inds < 0] == 0).all()
    # l, t, r, b in stride units: A at (20, 20) on P3 and B at (72, 88) on P4
    torch.testing.assert_close(reg[_index(0, 20, 20)], torch.tensor([1.5, 1.5, 2.5, 2.5]))
    torch.testing.assert_close(reg[_index(1, 72, 88)], torch.tensor([4.5, 5.5, 5.5, 4.5]))


def test_without_centre_sampling_the_whole_box_counts():
    fcos = _fcos(center_sampling_radius=0.0)
    out = _outputs(fcos)
    inst = _scene()[[0]]  # A alone: P3 cells with centres strictly inside 8..40
    gt_inds = fcos.get_targets(out, [inst])["gt_inds"][0]
    expected = {_index(0, x, y) for x in (12, 20, 28, 36) for y in (12, 20, 28, 36)}
    assert set(torch.nonzero(gt_inds >= 0).flatten().tolist()) == expected


def test_empty_image_is_all_background():
    fcos = _fcos(sample_in_mask=True)
    out = _outputs(fcos)
    tg = fcos.get_targets(out, [_scene()[[]]])
    assert (tg["gt_inds"] == -1).all() and (tg["labels"] == 4).all()


def test_locations_and_centerness():
    loc = compute_locations(2, 3, 8, torch.device("cpu"))
    assert loc.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    ctr = centerness_targets(torch.tensor([[1.0, 2.0, 3.0, 2.0], [2.0, 2.0, 2.0, 2.0]]))
    torch.testing.assert_close(ctr, torch.tensor([(1 / 3) ** 0.5, 1.0]))


def test_losses_are_finite_and_normalised():
    fcos = _fcos(sample_in_mask=True)
    head_feats = [torch.randn(2, 8, max(IMAGE // s, 1), max(IMAGE // s, 1)) for s in STRIDES]
    out = fcos(head_feats)
    tg = fcos.get_targets(out, [_scene(), _scene()[[]]])
    losses = fcos.losses(out, tg)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert all(torch.isfinite(v) for v in losses.values())
    # perfect regression gives zero GIoU loss
    out["bbox_reg"] = tg["reg_targets"].clone()
    assert fcos.losses(out, tg)["loss_fcos_loc"].abs() < 1e-5


def test_inference_decodes_boxes_and_applies_classwise_nms():
    fcos = _fcos(inference_th=0.5, nms_th=0.6, post_nms_topk=10)
    out = _outputs(fcos)
    n = out["locations"].shape[0]
    out["logits"] = torch.full((1, n, 4), -10.0)
    out["ctrness"] = torch.full((1, n), 10.0)
    out["bbox_reg"] = torch.full((1, n, 4), 3.0)  # 3 strides = 24 px to every side on P3
    i, j = _index(0, 20, 20), _index(0, 28, 20)
    # two class-1 boxes 8 px apart (IoU 40*48 / (2*48*48 - 40*48) = 0.71 > 0.6) and one class-2
    out["logits"][0, [i, j], 1] = torch.tensor([3.0, 2.0])
    out["logits"][0, j, 2] = 1.0
    res = fcos.predict_instances(out, [(IMAGE, IMAGE)])[0]
    assert res.pred_classes.tolist() == [1, 2]
    torch.testing.assert_close(res.pred_boxes.tensor[0], torch.tensor([0.0, 0.0, 44.0, 44.0]))
    torch.testing.assert_close(res.pred_boxes.tensor[1], torch.tensor([4.0, 0.0, 52.0, 44.0]))
    torch.testing.assert_close(
        res.scores, torch.sigmoid(torch.tensor([3.0, 1.0])) * torch.sigmoid(torch.tensor(10.0))
    )


@pytest.mark.parametrize("convention", ["maskrcnn-benchmark", "detectron2"])
def test_border_boxes_clip_as_the_convention_says(convention):
    """maskrcnn-benchmark's BoxList.clip_to_image clamps to [0, size - 1]; Detectron2 to size."""
    fcos = _fcos(inference_th=0.5, box_convention=convention)
    out = _outputs(fcos)
    n = out["locations"].shape[0]
    out["logits"] = torch.full((1, n, 4), -10.0)
    out["ctrness"] = torch.full((1, n), 10.0)
    out["bbox_reg"] = torch.full((1, n, 4), 3.0)
    out["logits"][0, _index(0, 116, 116), 1] = 3.0  # 116 +- 24 crosses both far borders
    res = fcos.predict_instances(out, [(IMAGE, 100)])[0]  # unpadded 128 x 100 of a 128 x 128
    far = (99.0, 127.0) if convention == "maskrcnn-benchmark" else (100.0, 128.0)
    torch.testing.assert_close(res.pred_boxes.tensor, torch.tensor([[92.0, 92.0, *far]]))


def test_official_nms_uses_plus_one_widths():
    """Boxes 0..10 and 1..11 (x), 0..10 (y): IoU 90 / 110 = 0.818 with Detectron2 widths,
    110 / 132 = 0.833 with maskrcnn-benchmark's x2 - x1 + 1: at NMS IoU 0.825 only the
    latter suppresses the second box."""
    from embedmask.fcos import class_wise_nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    scores, classes = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 2])
    assert class_wise_nms(boxes, scores, classes, 0.825).tolist() == [0, 1, 2]
    assert class_wise_nms(boxes, scores, classes, 0.825, plus_one=True).tolist() == [0, 2]
    fcos = _fcos(nms_th=0.825, post_nms_topk=1, box_convention="maskrcnn-benchmark")
    kept = fcos._nms(boxes.clone(), torch.tensor([0.9, 0.8, 0.9]), classes, (64, 64))
    assert kept.tolist() == [0, 2]  # a tie with the last kept score is kept (v2's kthvalue)
    fcos = _fcos(nms_th=0.825, box_convention="detectron2")
    assert fcos._nms(boxes.clone(), scores, classes, (64, 64)).tolist() == [0, 1, 2]


def test_fcos_iou_loss_is_smoothed_giou_by_hand():
    """pred (1, 1, 1, 1), target (1, 1, 2, 2): I = 2 * 2 = 4, U = 4 + 9 - 4 = 9, enclosing
    3 * 3 = 9 = U. FCOS: 1 - (4 + 1) / (9 + 1) = 0.5; plain GIoU: 1 - 4 / 9."""
    from embedmask.fcos import fcos_iou_loss

    pred, target = torch.tensor([[1.0, 1, 1, 1]]), torch.tensor([[1.0, 1, 2, 2]])
    torch.testing.assert_close(fcos_iou_loss(pred, target), torch.tensor([0.5]))
    torch.testing.assert_close(fcos_iou_loss(pred, target, 0.0), torch.tensor([1 - 4 / 9]))


def test_official_targets_use_inclusive_gt_boxes():
    """maskrcnn-benchmark GT boxes end at x + w - 1: r and b are 1 px (1 / stride) smaller."""
    ours, official = _fcos(), _fcos(box_convention="maskrcnn-benchmark")
    out = _outputs(ours)
    scene = _scene()[[1]]  # C: 0..48, no mask cut
    tg_d2 = ours.get_targets(out, [scene])
    tg_mb = official.get_targets(out, [scene])
    pos = (tg_d2["gt_inds"][0] >= 0) & (tg_mb["gt_inds"][0] >= 0)  # the centre region moves
    assert pos.sum() >= 4
    diff = (tg_d2["reg_targets"][0] - tg_mb["reg_targets"][0])[pos] * out["strides"][pos, None]
    torch.testing.assert_close(diff, torch.tensor([0.0, 0.0, 1.0, 1.0]).expand_as(diff))
