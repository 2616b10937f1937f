"""Mask probability formula, the embedding heads, margin gradients and the mask loss pieces."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from embedmask.embed_head import EmbedMaskHead, mask_log_probability
from embedmask.mask_loss import (
    EmbedMaskLoss,
    logit_from_log_probability,
    sample_gt_masks,
)

from common.modeling.losses import lovasz_hinge


def test_mask_probability_equals_formula_on_a_tiny_case():
    # p_ik = exp(-sum_d m_kd (e_id - q_kd)^2), by hand
    e = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [3.0, -1.0, 2.0]])
    q = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[0.5, 2.0, 1.0], [1.0, 1.0, 1.0]])
    expected = torch.tensor([[3.5, 3.0, 11.0], [0.0, 5.0, 14.0]])
    log_p = mask_log_probability(e, q, m)
    torch.testing.assert_close(log_p, -expected)
    torch.testing.assert_close(log_p.exp(), torch.exp(-expected))


def test_mask_probability_matches_brute_force_with_image_coordinates():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(500, 16, generator=g)
    e[:, :2] += torch.rand(500, 2, generator=g) * 13.0  # coordinates / 100 of a 1333 px image
    q = e[torch.randint(0, 500, (7,), generator=g)] + 0.1 * torch.randn(7, 16, generator=g)
    m = torch.rand(7, 16, generator=g) * 50 + 0.01
    brute = -(m[:, None] * (e[None] - q[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(mask_log_probability(e, q, m), brute, atol=2e-3, rtol=1e-4)
    # the paper's scalar form exp(-||e - q||^2 / (2 sigma^2)) is m = 1 / (2 sigma^2) on every dim
    sigma = 0.7
    scalar = torch.full((7, 16), 1 / (2 * sigma**2))
    paper = -((e[None] - q[:, None]) ** 2).sum(-1) / (2 * sigma**2)
    torch.testing.assert_close(mask_log_probability(e, q, scalar), paper, atol=2e-3, rtol=1e-4)


def test_logit_of_probability_is_stable_and_clamped():
    log_p = torch.tensor([-0.1, -0.6931, -3.0, 0.0, -50.0])
    p = log_p.exp().clamp(1e-9, 1 - 1e-6)
    logits = logit_from_log_probability(log_p)
    torch.testing.assert_close(logits[:3], torch.log(p[:3]) - torch.log1p(-p[:3]))
    assert logits[3] == pytest.approx(-math.log(1e-9), rel=1e-3)  # p = 1 clamps to 1 - 1e-9
    assert logits[4] == pytest.approx(math.log(1e-9), rel=1e-3)


def _head(**kw) -> EmbedMaskHead:
    return EmbedMaskHead(in_channels=32, num_levels=2, embed_dim=6, mask_num_convs=1, **kw)


def test_heads_shapes_initial_margin_and_coordinates():
    head = _head()
    p3 = torch.randn(2, 32, 4, 6)
    pix = head.pixel_embedding(p3, stride=8)
    assert pix.shape == (2, 6, 8, 12)
    towers = [torch.randn(2, 32, 4, 6), torch.randn(2, 32, 2, 3)]
    emb, margin = head.proposal_embedding(towers, [8, 16])
    assert emb.shape == margin.shape == (2, 4 * 6 + 2 * 3, 6)
    # bias init: p = 0.5 at distance PRIOR_MARGIN = 2 along one dim
    prior = -math.log(0.5) / 4.0
    assert margin.mean().item() == pytest.approx(prior, rel=0.05)
    # the spatial dims are conv + location / 100 (x position_scale = 1); zero features -> 0 + loc
    emb0, _ = head.proposal_embedding([torch.zeros(1, 32, 4, 6), torch.zeros(1, 32, 2, 3)], [8, 16])
    torch.testing.assert_close(emb0[0, 1, :2], torch.tensor([0.12, 0.04]))  # P3 cell x=12, y=4
    torch.testing.assert_close(emb0[0, 24 + 4, :2], torch.tensor([0.24, 0.24]))  # P4 x=24, y=24
    torch.testing.assert_close(emb0[0, :, 2:], torch.zeros(30, 4))


def test_position_unit_scales_the_coordinates():
    """POSITION_UNIT (v2: 100 px) divides the locations added to the spatial dims of both heads."""
    head = _head(position_unit=8.0)
    emb0, _ = head.proposal_embedding([torch.zeros(1, 32, 4, 6), torch.zeros(1, 32, 2, 3)], [8, 16])
    torch.testing.assert_close(emb0[0, 1, :2], torch.tensor([1.5, 0.5]))  # P3 cell x=12, y=4
    torch.testing.assert_close(emb0[0, 24 + 4, :2], torch.tensor([3.0, 3.0]))  # P4 x=24, y=24
    for module in (head.mask_tower, head.pixel_spatial_embed_pred):
        for param in module.parameters():
            torch.nn.init.zeros_(param)
    pix = head.pixel_embedding(torch.zeros(1, 32, 4, 6), stride=8)  # x2 bilinear of loc / 8
    steps = pix[0, 0, 0, 1:-1].diff()  # half a P3 cell (4 px) between stride-4 columns
    torch.testing.assert_close(steps, torch.full_like(steps, 0.5))
    with pytest.raises(ValueError, match="POSITION_UNIT"):
        _head(position_unit=0.0)


@pytest.mark.parametrize("per_dim", [True, False])
def test_margin_gradient_flows(per_dim):
    torch.manual_seed(0)
    head = _head(margin_per_dim=per_dim)
    pix = head.pixel_embedding(torch.randn(1, 32, 4, 4), stride=8)[0].flatten(1).t()
    emb, margin = head.proposal_embedding(
        [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)], [8, 16]
    )
    logits = logit_from_log_probability(
        mask_log_probability(pix, emb[0, [3, 17]], margin[0, [3, 17]])
    )
    labels = torch.zeros_like(logits)
    labels[:, :10] = 1
    lovasz_hinge(logits, labels).backward()
    grad = head.proposal_margin_pred.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert head.proposal_margin_pred.bias.grad.abs().sum() > 0
    if per_dim:  # location 3 is on level 0, location 17 on level 1: both level scales learn
        assert all(s.scale.grad.abs().sum() > 0 for s in head.margin_scales)
    assert head.position_scale.scale.grad.abs().sum() > 0


def test_fixed_margin_is_the_prior_and_gets_no_gradient():
    head = _head(fix_margin=True)
    _, margin = head.proposal_embedding(
        [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)], [8, 16]
    )
    torch.testing.assert_close(margin, torch.full_like(margin, head.prior_precision))
    margin.sum().backward()
    assert head.proposal_margin_pred.weight.grad.abs().sum() == 0


def _instance(boxes, masks) -> Instances:
    inst = Instances(masks.shape[-2:])
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float))
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    return inst


def test_gt_masks_are_sampled_at_grid_centres():
    masks = torch.zeros(1, 10, 9, dtype=torch.bool)
    masks[0, 2, 6] = True  # the centre of grid cell (0, 1) at stride 4
    masks[0, 3, 3] = True  # not a centre
    out = sample_gt_masks(_instance([[0, 0, 9, 10]], masks), (4, 3), stride=4)
    assert out.shape == (1, 4, 3)
    assert torch.nonzero(out[0]).tolist() == [[0, 1]]


def test_select_positives_best_and_iou_mean():
    pos_idx = torch.tensor([10, 11, 12, 13, 14])
    pos_gt = torch.tensor([0, 0, 2, 2, 0])
    ious = torch.tensor([0.3, 0.7, 0.2, 0.4, 0.6])
    best = EmbedMaskLoss(positive_sampling="best")
    loc, group, inst_gt = best.select_positives(pos_idx, pos_gt, ious, num_gt=3)
    assert loc.tolist() == [11, 13] and group.tolist() == [0, 1] and inst_gt.tolist() == [0, 2]
    mean = EmbedMaskLoss(positive_sampling="iou_mean", sample_pos_iou_th=0.5)
    loc, group, inst_gt = mean.select_positives(pos_idx, pos_gt, ious, num_gt=3)
    # GT 0: IoU > 0.5 -> 11, 14; GT 2: none passes -> its best, 13
    assert sorted(zip(loc.tolist(), group.tolist())) == [(11, 0), (13, 1), (14, 0)]
    assert inst_gt.tolist() == [0, 2]


def test_box_crop_equals_lovasz_on_the_cropped_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 64, generator=g) * 3
    labels = (torch.rand(1, 64, generator=g) > 0.5).float()
    inside = torch.zeros(1, 64, dtype=torch.bool)
    inside[0, 8:40] = True
    crop = torch.where(inside, logits, torch.full_like(logits, -1e4))
    torch.testing.assert_close(
        lovasz_hinge(crop, labels * inside), lovasz_hinge(logits[:, 8:40], labels[:, 8:40])
    )
