"""Tests of common.modeling.criterion.SetCriterion and common.modeling.loss_terms: keys for
aux/stage outputs,
finite values, gradients to every prediction, fixed matchings, match hooks, weight checks,
and the normaliser with 1 vs 2 processes (gloo on CPU)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from common.modeling.criterion import SetCriterion, reduce_normalizer
from common.modeling.loss_terms import LossTerm, register_loss_term, sample_matched_target_masks
from common.modeling.losses import point_sampled_mask_losses
from common.modeling.matcher import HungarianMatcher
from common.modeling.point_sampling import point_sample


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny problems only lose to OpenMP spin on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


C = 3
HW = (8, 8)
GT_HW = (32, 32)


def _pred(batch, queries, k, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, queries, 2, generator=g) * 20
    wh = torch.rand(batch, queries, 2, generator=g) * 10 + 1
    out = {
        "pred_logits": torch.randn(batch, queries, k, generator=g),
        "pred_masks": torch.randn(batch, queries, *HW, generator=g),
        "pred_boxes": torch.cat([xy, xy + wh], -1),
        "pred_locations": torch.rand(batch, queries, 2, generator=g),
    }
    for key in ("pred_logits", "pred_masks", "pred_boxes"):
        out[key].requires_grad_()
    return out


def _targets(counts, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 20
        wh = torch.rand(n, 2, generator=g) * 10 + 1
        out.append(
            {
                "labels": torch.randint(0, C, (n,), generator=g),
                "masks": (torch.rand(n, *GT_HW, generator=g) > 0.5).float(),
                "boxes": torch.cat([xy, xy + wh], -1),
                "image_size": (30, 31),
            }
        )
    return out


def _with_aux(batch, queries, k, num_aux, seed):
    out = _pred(batch, queries, k, seed)
    out["aux_outputs"] = [_pred(batch, queries, k, seed + 1 + i) for i in range(num_aux)]
    return out


def _all_pred_tensors(outputs):
    dicts = [outputs, *outputs.get("aux_outputs", [])]
    return [d[k] for d in dicts for k in ("pred_logits", "pred_masks", "pred_boxes")]


def _fastinst_criterion(num_points=200):
    matcher = HungarianMatcher(
        [
            ("softmax_class", 2.0),
            ("point_bce", 5.0, {"num_points": 200}),
            ("point_dice", 5.0, {"num_points": 200}),
            ("location", 1000.0),
        ]
    )
    return SetCriterion(
        matcher,
        C,
        ["labels_ce", "masks_point", "proposals"],
        {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_proposal": 20.0},
        loss_kwargs={"masks_point": {"num_points": num_points}},
        aux_losses=["labels_ce", "masks_point"],
    )


def test_fastinst_style_keys_values_and_gradients():
    crit = _fastinst_criterion()
    outputs = _with_aux(2, 6, C + 1, num_aux=3, seed=0)
    outputs["proposal_cls_logits"] = torch.randn(2, C + 1, 4, 4, requires_grad=True)
    targets = _targets([3, 0], seed=1)
    losses = crit(outputs, targets)
    expected = {"loss_ce", "loss_mask", "loss_dice", "loss_proposal"}
    expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_mask", "loss_dice") for i in range(3)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for t in [outputs["pred_logits"], outputs["pred_masks"], outputs["proposal_cls_logits"]]:
        assert t.grad is not None and t.grad.abs().sum() > 0
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].grad.abs().sum() > 0 and aux["pred_masks"].grad.abs().sum() > 0


def test_stage_keys_weights_and_gradients_reach_every_prediction():
    matcher = HungarianMatcher(
        [
            ("focal_class", 2.0),
            ("dice_sq", 4.0),
            ("mask_agreement", 1.0),
            ("box_l1", 5.0),
            ("giou", 2.0),
        ]
    )
    weights = {
        "loss_cls": 2.0,
        "loss_mask": 1.0,
        "loss_dice": 4.0,
        "loss_rank": 0.1,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
    }
    terms = ["labels_focal", "mask_bce", "mask_dice", "rank", "boxes"]
    stage_w = [0.5, 1.0, 2.0]
    crit = SetCriterion(
        matcher,
        C,
        terms,
        weights,
        normalizer="num_matched",
        key_style="stage",
        stage_loss_weights=stage_w,
        match_previous_stage=True,
    )
    outputs = _with_aux(2, 5, C, num_aux=2, seed=3)
    targets = _targets([2, 4], seed=4)
    losses = crit(outputs, targets)
    raw = crit(outputs, targets, weighted=False)
    keys = {f"{k}_s{s}" for k in weights for s in range(3)}
    assert set(losses) == set(raw) == keys
    for key, value in losses.items():
        base, stage = key.rsplit("_s", 1)
        assert torch.isfinite(value)
        assert torch.allclose(value, raw[key] * weights[base] * stage_w[int(stage)])
    sum(losses.values()).backward()
    for t in _all_pred_tensors(outputs):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_empty_batch_is_finite_with_grad():
    crit = _fastinst_criterion()
    outputs = _with_aux(2, 4, C + 1, num_aux=1, seed=5)
    outputs["proposal_cls_logits"] = torch.randn(2, C + 1, 4, 4, requires_grad=True)
    losses = crit(outputs, _targets([0, 0], seed=6))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0  # everything is no-object
    crit2 = SetCriterion(
        HungarianMatcher([("focal_class", 1.0)]),
        C,
        ["labels_focal", "mask_bce", "mask_dice", "boxes", "rank"],
        {
            "loss_cls": 1,
            "loss_mask": 1,
            "loss_dice": 1,
            "loss_bbox": 1,
            "loss_giou": 1,
            "loss_rank": 1,
        },
    )
    out2 = _pred(2, 4, C, seed=7)
    losses = crit2(out2, _targets([0, 0], seed=8))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert out2["pred_masks"].grad is not None


class _RecordingMatcher:
    """Matcher stub: records the dicts it was called on and returns a fixed diagonal matching."""

    def __init__(self):
        self.calls = []

    def __call__(self, outputs, targets):
        self.calls.append(outputs.get("tag"))
        return [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]


_SEEN_INDICES = []


@register_loss_term("test_capture_indices")
class _CaptureIndices(LossTerm):
    """Test-only term: records the matchings it receives."""

    keys = ("loss_capture",)

    def __call__(self, outputs, targets, indices, num_targets):
        _SEEN_INDICES.append([(s.tolist(), t.tolist()) for s, t in indices])
        return {"loss_capture": outputs["pred_logits"].sum() * 0}


def test_fixed_matching_and_match_hooks():
    _SEEN_INDICES.clear()
    seen = _SEEN_INDICES
    rec = _RecordingMatcher()
    targets = _targets([2, 1], seed=9)
    fixed = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    outputs = _pred(2, 4, C, seed=1)
    outputs["tag"] = "final"
    outputs["aux_outputs"] = [
        dict(_pred(2, 4, C, seed=2), tag="aux0", pred_matching_indices=fixed),
        dict(_pred(2, 4, C, seed=3), tag="aux1"),
        dict(_pred(2, 4, C, seed=4), tag="aux2", match_outputs={"tag": "explicit"}),
    ]
    crit = SetCriterion(rec, C, ["test_capture_indices"], {"loss_capture": 1.0})
    crit(outputs, targets)
    assert rec.calls == ["aux1", "explicit", "final"]  # aux0 reuses its fixed matching
    assert seen[0] == [([3, 1], [0, 1]), ([2], [0])]
    # K-Net: output s is matched on output s-1; per-stage matchers override
    rec.calls.clear()
    first = _RecordingMatcher()
    outputs["aux_outputs"] = [
        dict(_pred(2, 4, C, seed=2), tag="aux0"),
        dict(_pred(2, 4, C, seed=3), tag="aux1"),
    ]
    crit = SetCriterion(
        rec,
        C,
        ["test_capture_indices"],
        {"loss_capture": 1.0},
        match_previous_stage=True,
        stage_matchers=[first, None, None],
    )
    crit(outputs, targets)
    assert first.calls == ["aux0"] and rec.calls == ["aux0", "aux1"]


def test_weight_checks():
    matcher = HungarianMatcher([("focal_class", 1.0)])
    with pytest.raises(ValueError, match="loss_giou"):
        SetCriterion(matcher, C, ["boxes"], {"loss_bbox": 5.0})
    with pytest.raises(ValueError, match="loss_dcie"):
        SetCriterion(matcher, C, ["mask_dice"], {"loss_dice": 1.0, "loss_dcie": 1.0})
    with pytest.raises(ValueError, match="aux_losses"):
        SetCriterion(matcher, C, ["mask_dice"], {"loss_dice": 1.0}, aux_losses=["boxes"])
    # suffixed overrides are allowed and used
    crit = SetCriterion(matcher, C, ["mask_dice"], {"loss_dice": 1.0, "loss_dice_0": 0.0})
    outputs = _with_aux(1, 3, C, num_aux=1, seed=0)
    losses = crit(outputs, _targets([2], seed=1))
    assert losses["loss_dice_0"].item() == 0.0 and losses["loss_dice"].item() > 0

    def undeclared(outputs, targets, indices, num_targets):
        return {"loss_surprise": outputs["pred_logits"].sum()}

    crit = SetCriterion(matcher, C, [undeclared], {"loss_other": 1.0})
    with pytest.raises(KeyError, match="loss_surprise"):
        crit(_pred(1, 3, C, seed=0), _targets([1], seed=0))
    with pytest.raises(ValueError, match="stage_loss_weights"):
        SetCriterion(matcher, C, ["mask_dice"], {"loss_dice": 1.0}, stage_loss_weights=[1.0, 1.0])(
            _pred(1, 3, C, 0), _targets([1], 0)
        )


# ---------------------------------------------------------------- distributed normaliser


def _deterministic_criterion(normalizer):
    matcher = HungarianMatcher([("focal_class", 2.0), ("mask_bce", 1.0), ("giou", 2.0)])
    return SetCriterion(
        matcher,
        C,
        ["labels_focal", ("mask_bce", {"normalizer": "global"}), "boxes"],
        {"loss_cls": 2.0, "loss_mask": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        normalizer=normalizer,
    )


COUNTS = [3, 1, 0, 5]  # 4 images; 2 per worker in the 2-process run


def _full_batch():
    return _with_aux(4, 4, C, num_aux=1, seed=11), _targets(COUNTS, seed=12)


def _slice_outputs(outputs, sl):
    out = {k: v[sl].detach() for k, v in outputs.items() if k != "aux_outputs"}
    out["aux_outputs"] = [{k: v[sl].detach() for k, v in a.items()} for a in outputs["aux_outputs"]]
    return out


def _worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        outputs, targets = _full_batch()
        sl = slice(2 * rank, 2 * rank + 2)
        mine = _slice_outputs(outputs, sl)
        result = {}
        for normalizer in ("num_targets", "num_matched"):
            crit = _deterministic_criterion(normalizer)
            total = sum(crit(mine, targets[sl]).values()).detach().reshape(1)
            dist.all_reduce(total)  # DDP averages gradients: compare the mean of the losses
            result[normalizer] = (total / world).item()
        result["normaliser"] = crit.compute_num_targets(targets[sl], torch.device("cpu"))
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_normaliser_same_with_one_and_two_processes():
    outputs, targets = _full_batch()
    single = {
        n: sum(
            _deterministic_criterion(n)(_slice_outputs(outputs, slice(0, 4)), targets).values()
        ).item()
        for n in ("num_targets", "num_matched")
    }
    assert reduce_normalizer(sum(COUNTS), torch.device("cpu")) == float(sum(COUNTS))
    assert reduce_normalizer(0, torch.device("cpu")) == 1.0
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for res in results:
        # per-worker normaliser = global count / world size
        assert res["normaliser"] == pytest.approx(sum(COUNTS) / 2)
        for n in ("num_targets", "num_matched"):
            assert res[n] == pytest.approx(single[n], rel=1e-5)


def test_point_target_sampling_equals_padded_batch():
    """Sampling in place (permuted points, rescaled coords) == Mask2Former's padded copy."""
    g = torch.Generator().manual_seed(21)
    targets = [
        {"masks": torch.rand(3, 20, 16, generator=g)},  # all matched: in-place path
        {"masks": (torch.rand(5, 24, 12, generator=g) > 0.5)},  # partial, bool, other size
    ]
    indices = [
        (torch.tensor([0, 2, 4]), torch.tensor([2, 0, 1])),
        (torch.tensor([1, 3]), torch.tensor([4, 1])),
    ]
    coords = torch.rand(5, 40, 2, generator=g)
    ours = sample_matched_target_masks(targets, indices, coords)
    padded = [
        F.pad(t["masks"].float(), (0, 16 - t["masks"].shape[-1], 0, 24 - t["masks"].shape[-2]))
        for t in targets
    ]
    picked = torch.cat([p[j] for p, (_, j) in zip(padded, indices)])
    ref = point_sample(picked[:, None], coords)[:, 0]
    assert torch.allclose(ours, ref, atol=1e-6)


def test_point_mask_term_equals_pure_function():
    term = SetCriterion(
        HungarianMatcher([("dice", 1.0)]),
        C,
        ["masks_point"],
        {"loss_mask": 1.0, "loss_dice": 1.0},
        loss_kwargs={"masks_point": {"num_points": 64}},
    ).terms[0]
    outputs = _pred(2, 4, C, seed=2)
    targets = _targets([2, 3], seed=3)
    indices = [
        (torch.tensor([1, 3]), torch.tensor([1, 0])),
        (torch.tensor([0, 2]), torch.tensor([2, 0])),
    ]
    torch.manual_seed(5)
    got = term(outputs, targets, indices, 2.5)
    torch.manual_seed(5)
    src = torch.cat([outputs["pred_masks"][b, s] for b, (s, _) in enumerate(indices)])
    tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])
    bce, dice = point_sampled_mask_losses(src, tgt, num_points=64, avg_factor=2.5)
    assert torch.allclose(got["loss_mask"], bce) and torch.allclose(got["loss_dice"], dice)
