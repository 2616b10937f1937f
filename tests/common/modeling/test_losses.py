"""Tests of common.modeling.losses and common.modeling.point_sampling: hand-computed values,
references,
gradients (float64 gradcheck) and empty inputs."""

import math

import pytest
import torch
import torchvision
from torch.nn import functional as F

from common.modeling import losses as L
from common.modeling import point_sampling as PS


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny problems only lose to OpenMP spin on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


LN2 = math.log(2.0)


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _boxes(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 50
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 30 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------- reductions


def test_reduce_loss_modes_and_errors():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert L.reduce_loss(x, "sum").item() == 6.0
    assert L.reduce_loss(x, "mean").item() == 2.0
    assert L.reduce_loss(x, "mean", avg_factor=4).item() == 1.5
    assert L.reduce_loss(x, "mean", avg_factor=torch.tensor(0.0)).isfinite()
    assert torch.equal(L.reduce_loss(x, "none"), x)
    with pytest.raises(ValueError):
        L.reduce_loss(x, "sum", avg_factor=2)
    with pytest.raises(ValueError):
        L.reduce_loss(x, "mean", avg_factor=0)
    with pytest.raises(ValueError):
        L.reduce_loss(x, "avg")


# ---------------------------------------------------------------- focal


def test_focal_hand_value():
    # logit 0 -> p = 0.5; positive: 0.25 * 0.5^2 * ln2; negative: 0.75 * 0.5^2 * ln2
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    loss = L.sigmoid_focal_loss(logits, targets, reduction="none")
    assert torch.allclose(loss, torch.tensor([[0.25 * 0.25 * LN2, 0.75 * 0.25 * LN2]]))
    total = L.sigmoid_focal_loss(logits, targets, reduction="mean", avg_factor=2.0)
    assert math.isclose(total.item(), 0.25 * LN2 / 2, rel_tol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_matches_torchvision(reduction):
    logits = _rand(6, 5, seed=1) * 3
    targets = (torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) > 0.7).double()
    ours = L.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction=reduction)
    ref = torchvision.ops.sigmoid_focal_loss(logits, targets, 0.25, 2.0, reduction=reduction)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_focal_gradcheck_and_empty():
    logits = _rand(4, 3, seed=3).requires_grad_()
    targets = torch.eye(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: L.sigmoid_focal_loss(x, targets, avg_factor=3.0), (logits,)
    )
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = L.sigmoid_focal_loss(empty, torch.zeros(0, 3))
    assert loss.item() == 0.0 and loss.grad_fn is not None


# ---------------------------------------------------------------- softmax CE


def test_softmax_ce_hand_and_reference():
    loss = L.softmax_ce_loss(torch.zeros(1, 2), torch.tensor([0]))
    assert math.isclose(loss.item(), LN2, rel_tol=1e-6)
    logits = _rand(2, 7, 4, seed=4)
    labels = torch.randint(0, 4, (2, 7), generator=torch.Generator().manual_seed(5))
    labels[0, 0] = -1
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)
    ours = L.softmax_ce_loss(logits, labels, class_weight=weight, ignore_index=-1)
    ref = F.cross_entropy(logits.transpose(1, 2), labels, weight, ignore_index=-1)
    assert torch.allclose(ours, ref)
    none = L.softmax_ce_loss(logits, labels, class_weight=weight, ignore_index=-1, reduction="none")
    assert none.shape == labels.shape and none[0, 0] == 0
    assert torch.allclose(
        L.softmax_ce_loss(logits, labels, class_weight=weight, ignore_index=-1, avg_factor=3.0),
        none.sum() / 3,
    )


def test_softmax_ce_gradcheck_and_empty():
    logits = _rand(5, 4, seed=6).requires_grad_()
    labels = torch.tensor([0, 3, 1, 3, 2])
    weight = torch.tensor([1.0, 2.0, 1.0, 0.1], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: L.softmax_ce_loss(x, labels, class_weight=weight), (logits,)
    )
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = L.softmax_ce_loss(empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    ignored = L.softmax_ce_loss(torch.zeros(3, 4), torch.full((3,), -1), ignore_index=-1)
    assert ignored.item() == 0.0


# ---------------------------------------------------------------- BCE / dice


def test_bce_hand_value_and_normaliser():
    logits = torch.zeros(2, 3, 3)  # BCE(0, t) = ln2 for every t
    targets = torch.rand(2, 3, 3)
    assert math.isclose(L.bce_with_logits_loss(logits, targets).item(), LN2, rel_tol=1e-6)
    per_mask_sum = L.bce_with_logits_loss(logits, targets, reduction="sum")
    assert math.isclose(per_mask_sum.item(), 2 * LN2, rel_tol=1e-6)
    assert math.isclose(
        L.bce_with_logits_loss(logits, targets, avg_factor=4.0).item(), LN2 / 2, rel_tol=1e-6
    )
    x = _rand(3, 5, seed=7).requires_grad_()
    t = torch.rand(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: L.bce_with_logits_loss(a, t, avg_factor=2.0), (x,))
    empty = torch.zeros(0, 4, 4, requires_grad=True)
    loss = L.bce_with_logits_loss(empty, torch.zeros(0, 4, 4))
    assert loss.item() == 0.0 and loss.grad_fn is not None


def test_dice_hand_values():
    p = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 1.0]])
    plain = L.dice_loss(p, t, form="plain", eps=1.0, from_logits=False)
    assert math.isclose(plain.item(), 1 - 3 / 4, rel_tol=1e-6)
    sq = L.dice_loss(p, t, form="squared", eps=1e-3, from_logits=False)
    assert math.isclose(sq.item(), 1 - 2 / (1 + 1e-3 + 2 + 1e-3), rel_tol=1e-6)
    # logits in: sigmoid(0) = 0.5 everywhere -> plain: 1 - (2*1 + 1)/(1 + 2 + 1)
    logit = L.dice_loss(torch.zeros(1, 2), t, form="plain", eps=1.0, from_logits=True)
    assert math.isclose(logit.item(), 0.25, rel_tol=1e-6)
    # QueryInst: sum / avg_factor
    two = L.dice_loss(
        p.repeat(2, 1), t.repeat(2, 1), form="squared", eps=1e-5, from_logits=False, avg_factor=4.0
    )
    assert math.isclose(two.item(), 2 * (1 - 2 / (3 + 2e-5)) / 4, rel_tol=1e-6)
    with pytest.raises(ValueError):
        L.dice_loss(p, t, form="cubic")


@pytest.mark.parametrize(
    "form,eps,from_logits",
    [("plain", 1.0, True), ("squared", 1e-3, True), ("squared", 1e-5, False)],
)
def test_dice_gradcheck_and_empty(form, eps, from_logits):
    x = _rand(3, 4, 4, seed=8)
    x = (x if from_logits else x.sigmoid()).requires_grad_()
    t = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(9)) > 0.5).double()
    assert torch.autograd.gradcheck(
        lambda a: L.dice_loss(a, t, form=form, eps=eps, from_logits=from_logits), (x,)
    )
    empty = torch.zeros(0, 4, 4, requires_grad=True)
    loss = L.dice_loss(empty, torch.zeros(0, 4, 4), form=form, eps=eps, from_logits=from_logits)
    assert loss.item() == 0.0 and loss.grad_fn is not None


# ---------------------------------------------------------------- point sampling


def test_point_sampling_matches_detectron2():
    pf = pytest.importorskip("detectron2.projects.point_rend.point_features")
    maps = torch.randn(3, 1, 9, 7)
    coords = torch.rand(3, 20, 2)
    assert torch.allclose(
        PS.point_sample(maps, coords), pf.point_sample(maps, coords, align_corners=False)
    )
    # channels-of-one-image trick == one image per mask
    shared = torch.rand(20, 2)
    per_mask = pf.point_sample(maps, shared[None].expand(3, -1, -1), align_corners=False)[:, 0]
    assert torch.allclose(PS.sample_channels_at_points(maps[:, 0], shared), per_mask, atol=1e-6)
    # importance sampling: same RNG draws -> same points
    torch.manual_seed(11)
    ours = PS.get_uncertain_point_coords_with_randomness(
        maps, PS.calculate_uncertainty, 16, 3, 0.75
    )
    torch.manual_seed(11)
    ref = pf.get_uncertain_point_coords_with_randomness(maps, PS.calculate_uncertainty, 16, 3, 0.75)
    assert torch.allclose(ours, ref)


def test_point_sampled_mask_losses_value_and_empty():
    logits = torch.randn(2, 8, 8, requires_grad=True)
    targets = (torch.rand(2, 32, 32) > 0.5).float()
    gen = torch.Generator().manual_seed(3)
    bce, dice = L.point_sampled_mask_losses(
        logits,
        targets,
        num_points=50,
        oversample_ratio=1.0,
        importance_sample_ratio=0.0,
        avg_factor=4.0,
        generator=gen,
    )
    # importance ratio 0: the candidates (1st draw) are all discarded, the points are the 2nd draw
    gen2 = torch.Generator().manual_seed(3)
    torch.rand(2, 50, 2, generator=gen2)
    coords = torch.rand(2, 50, 2, generator=gen2)
    pl = PS.point_sample(logits[:, None], coords)[:, 0]
    pt = PS.point_sample(targets[:, None], coords)[:, 0]
    assert torch.allclose(
        bce, F.binary_cross_entropy_with_logits(pl, pt, reduction="none").mean(1).sum() / 4
    )
    p = pl.sigmoid()
    ref_dice = (1 - (2 * (p * pt).sum(1) + 1) / (p.sum(1) + pt.sum(1) + 1)).sum() / 4
    assert torch.allclose(dice, ref_dice)
    (bce + dice).backward()
    assert logits.grad.abs().sum() > 0
    empty = torch.zeros(0, 8, 8, requires_grad=True)
    zb, zd = L.point_sampled_mask_losses(empty, torch.zeros(0, 32, 32), avg_factor=1.0)
    assert zb.item() == 0 and zd.item() == 0 and zb.grad_fn is not None


# ---------------------------------------------------------------- boxes


def test_l1_and_giou_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert L.l1_box_loss(a, b, reduction="sum").item() == 4.0
    # IoU = 1/7, enclosing 9, union 7 -> GIoU = 1/7 - 2/9
    assert math.isclose(L.giou_loss(a, b).item(), 1 - (1 / 7 - 2 / 9), rel_tol=1e-6)
    p, t = _boxes(6, seed=1), _boxes(6, seed=2)
    ref = torchvision.ops.generalized_box_iou_loss(p, t, reduction="none")
    assert torch.allclose(L.giou_loss(p, t, reduction="none"), ref, atol=1e-6)
    pair = torchvision.ops.generalized_box_iou(p, t[:4])
    assert torch.allclose(L.pairwise_generalized_box_iou(p, t[:4]), pair, atol=1e-6)
    p.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: L.giou_loss(x, t, avg_factor=3.0), (p,))
    assert torch.autograd.gradcheck(lambda x: L.l1_box_loss(x, t + 0.5, avg_factor=3.0), (p,))
    norm = L.normalize_boxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (40, 100))
    assert torch.allclose(norm, torch.tensor([[0.1, 0.5, 0.3, 1.0]]))
    empty = torch.zeros(0, 4, requires_grad=True)
    for fn in (L.l1_box_loss, L.giou_loss):
        loss = fn(empty, torch.zeros(0, 4), avg_factor=1.0)
        assert loss.item() == 0 and loss.grad_fn is not None


# ---------------------------------------------------------------- Lovász hinge


def _jaccard_loss_of_set(wrong, gt):
    """Delta_J(S) = 1 - |G \\ S| / |G u S| for the set S of mispredicted pixels."""
    union = gt | wrong
    return 0.0 if not union else 1.0 - len(gt - wrong) / len(union)


def _lovasz_by_level_sets(logits, labels):
    """Direct evaluation of the Lovász extension of Delta_J at m = relu(1 - x s) as the
    Choquet integral  int_0^inf Delta_J({i : m_i >= t}) dt  (no sorting formula involved)."""
    x = logits.tolist()
    y = labels.tolist()
    m = [max(0.0, 1.0 - xi * (2 * yi - 1)) for xi, yi in zip(x, y)]
    gt = {i for i, yi in enumerate(y) if yi > 0.5}
    levels = sorted(set(v for v in m if v > 0))
    total, prev = 0.0, 0.0
    for t in levels:
        total += (t - prev) * _jaccard_loss_of_set({i for i, v in enumerate(m) if v >= t}, gt)
        prev = t
    return total


def test_lovasz_hinge_hand_value():
    # one fg pixel predicted -1 (error 2), one bg pixel predicted -1 (error 0): loss = 2 * 1
    loss = L.lovasz_hinge(torch.tensor([[-1.0, -1.0]]), torch.tensor([[1.0, 0.0]]))
    assert math.isclose(loss.item(), 2.0, rel_tol=1e-6)
    # perfect margins -> 0
    perfect = L.lovasz_hinge(torch.tensor([[2.0, -3.0]]), torch.tensor([[1.0, 0.0]]))
    assert perfect.item() == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_lovasz_hinge_equals_definition(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64) * 2
    labels = (torch.rand(4, 7, generator=g) > 0.5).double()
    labels[0] = 0.0  # an instance with no foreground
    per_inst = L.lovasz_hinge(logits, labels, reduction="none")
    ref = torch.tensor(
        [_lovasz_by_level_sets(x, y) for x, y in zip(logits, labels)], dtype=torch.float64
    )
    assert torch.allclose(per_inst, ref, atol=1e-12)
    assert torch.allclose(L.lovasz_hinge(logits, labels), ref.mean())
    flat = L.lovasz_hinge(logits, labels, per_instance=False)
    assert math.isclose(
        flat.item(), _lovasz_by_level_sets(logits.flatten(), labels.flatten()), rel_tol=1e-9
    )


def test_lovasz_gradcheck_and_empty():
    logits = _rand(3, 2, 5, seed=13).requires_grad_()
    labels = (torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(14)) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: L.lovasz_hinge(x, labels), (logits,))
    empty = torch.zeros(0, 4, 4, requires_grad=True)
    loss = L.lovasz_hinge(empty, torch.zeros(0, 4, 4))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    no_pixels = L.lovasz_hinge(torch.zeros(2, 0, requires_grad=True), torch.zeros(2, 0))
    assert no_pixels.item() == 0.0 and no_pixels.grad_fn is not None
