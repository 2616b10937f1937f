"""Tests of common.modeling.matcher / common.modeling.costs: every cost term against a per-pair
reference,
the assignment against brute-force enumeration, batch-vs-single invariance, empty targets,
Q < G, fp32 under autocast and the NaN guard."""

import itertools
import math

import pytest
import torch
import torchvision
from fastinst.losses import proposal_match_outputs  # registers `location`, `proposal_location`
from torch.nn import functional as F

from common.modeling import losses as L
from common.modeling.costs import CostTerm, register_cost_term
from common.modeling.matcher import HungarianMatcher


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny problems only lose to OpenMP spin on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


NUM_CLASSES = 4
PRED_HW = (8, 8)
GT_HW = (24, 20)  # a different resolution: costs resize or point-sample
NUM_POINTS = 300


def _make_outputs(batch, num_queries, seed, softmax=False):
    g = torch.Generator().manual_seed(seed)
    k = NUM_CLASSES + 1 if softmax else NUM_CLASSES
    xy = torch.rand(batch, num_queries, 2, generator=g) * 15
    wh = torch.rand(batch, num_queries, 2, generator=g) * 8 + 1
    return {
        "pred_logits": torch.randn(batch, num_queries, k, generator=g) * 2,
        "pred_masks": torch.randn(batch, num_queries, *PRED_HW, generator=g) * 3,
        "pred_boxes": torch.cat([xy, xy + wh], dim=-1),
        "pred_locations": torch.rand(batch, num_queries, 2, generator=g),
    }


def _make_target(num, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * 15
    wh = torch.rand(num, 2, generator=g) * 8 + 1
    # blobby masks so that the location cost is informative
    masks = (F.avg_pool2d(torch.rand(num, 1, *GT_HW, generator=g), 5, 1, 2)[:, 0] > 0.5).float()
    return {
        "labels": torch.randint(0, NUM_CLASSES, (num,), generator=g),
        "masks": masks,
        "boxes": torch.cat([xy, xy + wh], dim=-1),
        "image_size": torch.tensor([22, 18]),
    }


# ---------------------------------------------------------------- per-pair references


def _grid_sample_one(mask, coords):
    """Reference: sample ONE [H, W] map at [P, 2] normalised (x, y) points -> [P]."""
    grid = 2 * coords[None, :, None, :] - 1
    return F.grid_sample(mask[None, None].float(), grid, align_corners=False)[0, 0, :, 0]


def _resized(target):
    return F.interpolate(target["masks"][None], size=PRED_HW, mode="bilinear", align_corners=False)[
        0
    ]


def _reference_cost(name, pred, target, coords=None):
    """[Q, G] cost computed pair by pair with the loss functions / torchvision."""
    q_n, g_n = pred["pred_masks"].shape[0], target["labels"].shape[0]
    cost = torch.zeros(q_n, g_n)
    h, w = (float(v) for v in target["image_size"])
    whwh = torch.tensor([w, h, w, h])
    resized = _resized(target)
    for q, gi in itertools.product(range(q_n), range(g_n)):
        label = int(target["labels"][gi])
        m = pred["pred_masks"][q]
        if name == "focal_class":
            p = torch.sigmoid(pred["pred_logits"][q, label]).item()
            pos = -0.25 * (1 - p) ** 2 * math.log(p + 1e-12)
            neg = -0.75 * p**2 * math.log(1 - p + 1e-12)
            cost[q, gi] = pos - neg
        elif name == "softmax_class":
            cost[q, gi] = -pred["pred_logits"][q].softmax(-1)[label]
        elif name == "mask_agreement":
            p, t = m.sigmoid(), resized[gi]
            cost[q, gi] = -(p * t + (1 - p) * (1 - t)).mean()
        elif name == "mask_bce":
            cost[q, gi] = L.bce_with_logits_loss(m[None], resized[gi][None])
        elif name == "dice_sq":
            t = resized[gi][None]
            cost[q, gi] = L.dice_loss(m[None], t, form="squared", eps=1e-3) - 1
        elif name == "dice":
            cost[q, gi] = L.dice_loss(m[None], resized[gi][None], form="plain", eps=1.0)
        elif name in ("point_bce", "point_dice"):
            pl = _grid_sample_one(m, coords)[None]
            pt = _grid_sample_one(target["masks"][gi], coords)[None]
            if name == "point_bce":
                cost[q, gi] = L.bce_with_logits_loss(pl, pt)
            else:
                cost[q, gi] = L.dice_loss(pl, pt, form="plain", eps=1.0)
        elif name == "box_l1":
            cost[q, gi] = (pred["pred_boxes"][q] / whwh - target["boxes"][gi] / whwh).abs().sum()
        elif name == "giou":
            cost[q, gi] = -torchvision.ops.generalized_box_iou(
                pred["pred_boxes"][q : q + 1], target["boxes"][gi : gi + 1]
            )[0, 0]
        elif name == "location":
            v = _grid_sample_one(target["masks"][gi], pred["pred_locations"][q : q + 1])
            cost[q, gi] = -float(v.item() > 0)
        else:
            raise KeyError(name)
    return cost


def _brute_force_min(cost):
    """Minimum total cost over all injective assignments of the smaller side."""
    q_n, g_n = cost.shape
    best = math.inf
    if q_n >= g_n:
        for rows in itertools.permutations(range(q_n), g_n):
            best = min(best, sum(cost[r, c].item() for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(g_n), q_n):
            best = min(best, sum(cost[r, c].item() for r, c in enumerate(cols)))
    return best


ALL_TERMS = [
    "focal_class",
    "softmax_class",
    "mask_agreement",
    "mask_bce",
    "dice_sq",
    "dice",
    "point_bce",
    "point_dice",
    "box_l1",
    "giou",
    "location",
]
MIXES = {
    "knet": [("focal_class", 2.0), ("dice_sq", 4.0), ("mask_agreement", 1.0)],
    "queryinst": [("focal_class", 2.0), ("box_l1", 5.0), ("giou", 2.0)],
    "fastinst": [
        ("softmax_class", 2.0),
        ("point_bce", 5.0),
        ("point_dice", 5.0),
        ("location", 1000.0),
    ],
    "everything": [(n, 0.5 + i) for i, n in enumerate(ALL_TERMS)],
}


def _spec(name, weight):
    kwargs = {"num_points": NUM_POINTS} if name.startswith("point_") else {}
    return (name, weight, kwargs)


def _check_against_brute_force(specs, num_queries, num_targets, seed):
    softmax = any(n == "softmax_class" for n, _ in specs)
    if softmax and any(n == "focal_class" for n, _ in specs):
        softmax = False  # 'everything': both class terms read the same logits
    outputs = _make_outputs(2, num_queries, seed, softmax=softmax)
    targets = [_make_target(num_targets, seed + 100), _make_target(num_targets, seed + 200)]
    matcher = HungarianMatcher([_spec(n, w) for n, w in specs])
    torch.manual_seed(seed)
    indices = matcher(outputs, targets)
    torch.manual_seed(seed)  # replay the matcher's point draws: one [P, 2] draw per image
    refs = []
    for b in range(len(targets)):
        pred = {k: v[b] for k, v in outputs.items()}
        coords = torch.rand(NUM_POINTS, 2)
        refs.append(sum(w * _reference_cost(n, pred, targets[b], coords) for n, w in specs))
    for b, (rows, cols) in enumerate(indices):
        pred = {k: v[b] for k, v in outputs.items()}
        torch.manual_seed(seed + b)
        ours = matcher.compute_cost(pred, targets[b])
        torch.manual_seed(seed + b)
        coords = torch.rand(NUM_POINTS, 2)
        ref = sum(w * _reference_cost(n, pred, targets[b], coords) for n, w in specs)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
        ref = refs[b]
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert len(rows) == min(num_queries, num_targets)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert rows.tolist() == sorted(rows.tolist())
        total = ref[rows, cols].sum().item()
        assert total == pytest.approx(_brute_force_min(ref), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("name", ALL_TERMS)
@pytest.mark.parametrize("shape", [(5, 3), (3, 4)])
def test_each_term_equals_brute_force(name, shape):
    _check_against_brute_force([(name, 1.0)], *shape, seed=ALL_TERMS.index(name))


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_mixes_equal_brute_force(mix):
    _check_against_brute_force(MIXES[mix], 5, 4, seed=7)
    _check_against_brute_force(MIXES[mix], 3, 5, seed=8)


def test_proposal_location_matching_brute_force():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, NUM_CLASSES + 1, 2, 3, generator=g)
    target = _make_target(3, 4)
    matcher = HungarianMatcher([("softmax_class", 2.0), ("proposal_location", 1000.0)])
    ((rows, cols),) = matcher(proposal_match_outputs(logits), [target])
    prob = logits[0].flatten(1).T.softmax(-1)  # [HW, K]
    inside = F.adaptive_avg_pool2d(target["masks"][None], (2, 3))[0].flatten(1).T > 0
    ref = 2.0 * -prob[:, target["labels"]] + 1000.0 * -inside.float()
    assert ref[rows, cols].sum().item() == pytest.approx(_brute_force_min(ref), rel=1e-6)


def test_batch_equals_per_image():
    outputs = _make_outputs(4, 6, seed=1)
    targets = [_make_target(n, 10 + n) for n in (3, 0, 6, 8)]  # includes empty and G > Q
    matcher = HungarianMatcher(MIXES["knet"] + [("box_l1", 5.0), ("giou", 2.0)])
    batched = matcher(outputs, targets)
    for b, target in enumerate(targets):
        single = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_empty_targets_and_queries():
    matcher = HungarianMatcher(MIXES["fastinst"])
    outputs = _make_outputs(2, 5, seed=2, softmax=True)
    indices = matcher(outputs, [_make_target(0, 1), _make_target(0, 2)])
    for rows, cols in indices:
        assert rows.shape == (0,) and cols.shape == (0,) and rows.dtype == torch.int64
    no_queries = {k: v[:, :0] for k, v in outputs.items()}
    (rows, cols), _ = matcher(no_queries, [_make_target(3, 1), _make_target(0, 2)])
    assert rows.numel() == 0 and cols.numel() == 0


def test_more_targets_than_queries():
    matcher = HungarianMatcher(MIXES["queryinst"])
    ((rows, cols),) = matcher(_make_outputs(1, 3, seed=5), [_make_target(7, 6)])
    assert len(rows) == 3 and len(set(cols.tolist())) == 3 and cols.max() < 7


def test_nan_cost_raises_naming_term_and_image():
    outputs = _make_outputs(2, 4, seed=3)
    outputs["pred_masks"][1, 2, 0, 0] = float("nan")
    matcher = HungarianMatcher(MIXES["knet"])
    with pytest.raises(FloatingPointError, match=r"image 1.*dice_sq"):
        matcher(outputs, [_make_target(2, 1), _make_target(2, 2)])
    outputs = _make_outputs(1, 4, seed=3)
    outputs["pred_boxes"][0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="box_l1"):
        HungarianMatcher(MIXES["queryinst"])(outputs, [_make_target(2, 1)])


def test_fp32_under_autocast_and_half_inputs():
    outputs = _make_outputs(1, 5, seed=4)
    targets = [_make_target(3, 5)]
    matcher = HungarianMatcher(MIXES["knet"])
    ref = matcher(outputs, targets)
    half = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.compute_cost({k: v[0].float() for k, v in half.items()}, targets[0])
        got = matcher(half, targets)
    assert cost.dtype == torch.float32
    assert got[0][0].numel() == ref[0][0].numel() == 3


@register_cost_term("test_constant_diag")
class _DiagCost(CostTerm):
    """Test-only term: -1 on the diagonal, so the matching is (i, i)."""

    required_keys = ("pred_logits",)

    def __call__(self, pred, target, cache):
        q, g = pred["pred_logits"].shape[0], target["labels"].shape[0]
        return -torch.eye(q, g)


def test_registry_errors_and_custom_term():
    ((rows, cols),) = HungarianMatcher([("test_constant_diag", 1.0)])(
        _make_outputs(1, 4, seed=0), [_make_target(3, 0)]
    )
    assert rows.tolist() == cols.tolist() == [0, 1, 2]
    with pytest.raises(KeyError, match="unknown cost term"):
        HungarianMatcher([("no_such_cost", 1.0)])
    with pytest.raises(ValueError):
        HungarianMatcher([("dice", 0.0)])
    with pytest.raises(KeyError, match="pred_locations"):
        outputs = _make_outputs(1, 4, seed=0)
        del outputs["pred_locations"]
        HungarianMatcher([("location", 1.0)])(outputs, [_make_target(2, 0)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    outputs = _make_outputs(2, 6, seed=9)
    targets = [_make_target(4, 1), _make_target(0, 2)]
    matcher = HungarianMatcher(MIXES["knet"] + MIXES["queryinst"][1:] + [("location", 1000.0)])
    cpu = matcher(outputs, targets)
    dev = torch.device("cuda")
    cuda_targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
    with torch.autocast("cuda", dtype=torch.float16):
        gpu = matcher({k: v.to(dev).half() for k, v in outputs.items()}, cuda_targets)
    for (r1, c1), (r2, c2) in zip(cpu, gpu):
        assert r2.device.type == "cpu" and torch.equal(r1, r2) and torch.equal(c1, c2)
