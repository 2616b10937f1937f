"""Unit tests of FastInst's pieces: IA query selection, location cost, decoder outputs and the
GT attention mask, positional embeddings, config checks (the PPM-FPN's own tests:
tests/common/modeling/test_ppm_fpn.py)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from detectron2.modeling import build_model
from fastinst import FastInstDecoder, QueryProposal, build_fastinst_criterion, local_maximum_map
from torch import nn

from common.engine import get_cfg, merge_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SHAPES_INSTANCE = "projects/fastinst/configs/shapes/fastinst_R18_D1_shapes_instance.yaml"


def _brute_force_maxima(plane: torch.Tensor, eps: float = 1e-6) -> set[tuple[int, int]]:
    h, w = plane.shape
    out = set()
    for y, x in itertools.product(range(h), range(w)):
        v = float(plane[y, x])
        neighbours = [
            float(plane[y + dy, x + dx]) if 0 <= y + dy < h and 0 <= x + dx < w else 0.0
            for dy, dx in itertools.product((-1, 0, 1), repeat=2)
            if (dy, dx) != (0, 0)
        ]
        if v >= eps and all(v >= n for n in neighbours):
            out.add((y, x))
    return out


def test_local_maximum_map_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 7, 9, generator=g)
    scores[0, 0, 2:4, 2:4] = 0.5  # plateau: every pixel of it counts (>=)
    scores[1, 2] = 0.0  # all zero: no maximum (eps)
    got = local_maximum_map(scores)
    for b, c in itertools.product(range(2), range(3)):
        ys, xs = torch.nonzero(got[b, c], as_tuple=True)
        assert set(zip(ys.tolist(), xs.tolist())) == _brute_force_maxima(scores[b, c])


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


def _proposal_with_map(prob: torch.Tensor, num_queries: int, cls_map=None) -> QueryProposal:
    """QueryProposal whose classification head returns logits giving foreground prob ``prob``
    [H, W] for class ``cls_map`` [H, W] (default 0) out of 2 classes."""
    h, w = prob.shape
    cls_map = torch.zeros(h, w, dtype=torch.long) if cls_map is None else cls_map
    logits = torch.full((1, 3, h, w), -30.0)
    logits[0, 2] = torch.log1p(-prob)  # background
    logits[0].scatter_(0, cls_map[None], prob.log()[None])
    qp = QueryProposal(num_features=4, num_queries=num_queries, num_classes=2)
    qp.conv_proposal_cls_logits = _FixedLogits(logits)
    return qp


def test_query_selection_picks_local_maxima_before_other_pixels():
    h, w = 7, 9
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    hill = 0.95 * torch.exp(-((yy - 2) ** 2 + (xx - 2) ** 2) / 8.0)  # broad, high object
    bump = 0.30 * torch.exp(-((yy - 5) ** 2 + (xx - 7) ** 2) / 0.5)  # small, faint object
    prob = torch.maximum(hill, bump).clamp(1e-4, 1 - 1e-4)
    maxima = _brute_force_maxima(prob)
    assert {(2, 2), (5, 7)} <= maxima
    # the faint maximum (0.30) is weaker than many non-maximal hill pixels
    assert int((prob > 0.3).sum()) > len(maxima)

    qp = _proposal_with_map(prob, num_queries=len(maxima))
    x = torch.randn(2, 4, h, w)
    props = qp(x, torch.zeros(1, 4, h, w))
    for b in range(2):
        picked = {(int(i) // w, int(i) % w) for i in props.indices[b]}
        assert picked == maxima
    # more queries than maxima: maxima first, then the most confident other pixels
    qp.num_queries = len(maxima) + 3
    props = qp(x, torch.zeros(1, 4, h, w))
    first = {(int(i) // w, int(i) % w) for i in props.indices[0, : len(maxima)]}
    assert first == maxima
    rest = [float(prob.flatten()[i]) for i in props.indices[0, len(maxima) :]]
    others = sorted(
        (float(v) for i, v in enumerate(prob.flatten()) if (i // w, i % w) not in maxima),
        reverse=True,
    )
    assert rest == pytest.approx(others[:3])
    # content, position and corner-aligned (x, y) locations are gathered at the same pixels
    idx = props.indices[1]
    assert torch.equal(props.features[1], x[1].flatten(1).T[idx])
    loc = props.locations[1]
    assert torch.allclose(loc[:, 0], (idx % w).float() / (w - 1))
    assert torch.allclose(loc[:, 1], (idx // w).float() / (h - 1))


def test_local_maxima_are_per_class_plane():
    # pixel (1, 1) is class 1 with prob 0.5 next to a class-0 pixel of prob 0.9: still a maximum
    prob = torch.full((3, 3), 0.1)
    prob[1, 1], prob[1, 2] = 0.5, 0.9
    cls_map = torch.zeros(3, 3, dtype=torch.long)
    cls_map[1, 1] = 1
    qp = _proposal_with_map(prob, num_queries=2, cls_map=cls_map)
    props = qp(torch.randn(1, 4, 3, 3), torch.zeros(1, 4, 3, 3))
    assert set(props.indices[0].tolist()) == {4, 5}


def test_query_count_clipped_to_small_maps():
    qp = QueryProposal(num_features=4, num_queries=100, num_classes=2)
    props = qp(torch.randn(2, 4, 3, 5), torch.zeros(1, 4, 3, 5))
    assert props.features.shape == (2, 15, 4) and props.locations.shape == (2, 15, 2)


def _matcher(location_weight: float = 1000.0):
    cfg = get_cfg()
    cfg.MODEL.FASTINST.LOCATION_WEIGHT = location_weight
    return build_fastinst_criterion(cfg, num_classes=3).matcher


def test_location_cost_forbids_matches_outside_the_object():
    h = w = 32
    gt = torch.zeros(1, h, w)
    gt[0, :, : w // 2] = 1.0  # left half
    targets = [{"labels": torch.tensor([1]), "masks": gt}]
    logits = torch.full((1, 2, 4), -5.0)
    logits[0, 0, 1] = 8.0  # query 0: confident, right class ...
    logits[0, 1, 3] = 8.0  # query 1: confident "no object"
    masks = torch.full((1, 2, h // 4, w // 4), -8.0)
    masks[0, 0, :, : w // 8] = 8.0  # ... and a perfect mask
    locations = torch.tensor([[[0.9, 0.5], [0.2, 0.5]]])  # ... but selected outside the object
    outputs = {"pred_logits": logits, "pred_masks": masks, "pred_locations": locations}
    ((src, tgt),) = _matcher()(outputs, targets)
    assert src.tolist() == [1] and tgt.tolist() == [0]
    ((src, _),) = _matcher(location_weight=0.0)(outputs, targets)
    assert src.tolist() == [0]  # without the location cost the outside query wins


def test_dense_proposal_matching_stays_inside_objects():
    from fastinst.losses import proposal_match_outputs

    from common.modeling.matcher import HungarianMatcher

    gt = torch.zeros(2, 64, 64)
    gt[0, :16, :16] = 1
    gt[1, 40:, 30:50] = 1
    targets = [{"labels": torch.tensor([0, 2]), "masks": gt}]
    matcher = HungarianMatcher([("softmax_class", 2.0), ("proposal_location", 1000.0)])
    logits = torch.randn(1, 4, 8, 8)
    logits[0, 0] += 5.0  # class 0 confident everywhere, also outside its object
    ((src, tgt),) = matcher(proposal_match_outputs(logits), targets)
    for r, g in zip(src.tolist(), tgt.tolist()):
        y, x = divmod(r, 8)
        assert gt[g, y * 8 : y * 8 + 8, x * 8 : x * 8 + 8].any()


def _tiny_decoder(**kw) -> FastInstDecoder:
    args = dict(
        num_classes=3,
        hidden_dim=32,
        num_queries=6,
        num_aux_queries=2,
        nheads=4,
        dim_feedforward=64,
        dec_layers=2,
        mask_dim=32,
    )
    args.update(kw)
    return FastInstDecoder(**args)


def _targets(b: int, h: int, w: int) -> list[dict]:
    out = []
    for _ in range(b):
        masks = torch.zeros(2, h, w)
        masks[0, : h // 2, : w // 2] = 1
        masks[1, h // 2 :, w // 2 :] = 1
        out.append({"labels": torch.tensor([0, 2]), "masks": masks})
    return out


def test_decoder_outputs_guided_passes_with_fixed_matching():
    torch.manual_seed(0)
    dec = _tiny_decoder().train()
    e4, e3 = torch.randn(2, 32, 4, 6), torch.randn(2, 32, 8, 12)
    fixed = [(torch.tensor([0, 3]), torch.tensor([1, 0])), (torch.tensor([5]), torch.tensor([0]))]
    calls = []

    def matcher(outputs, targets):
        calls.append(sorted(outputs))
        return fixed

    out = dec(e4, e3, _targets(2, 64, 96), matcher)
    assert calls == [["pred_locations", "pred_logits", "pred_masks"]]
    assert out["pred_logits"].shape == (2, 6, 4) and out["pred_masks"].shape == (2, 6, 8, 12)
    assert out["proposal_cls_logits"].shape == (2, 4, 4, 6)
    aux = out["aux_outputs"]
    assert len(aux) == 2 * 2  # L guided passes + initial + layers 0..L-2
    for a in aux[:2]:
        assert a["pred_matching_indices"] is fixed
    for a in aux[2:]:
        assert "pred_matching_indices" not in a
        assert a["pred_logits"].shape == (2, 6, 4)

    dec_off = _tiny_decoder(gt_mask_guided=False).train()
    assert len(dec_off(e4, e3, _targets(2, 64, 96), matcher)["aux_outputs"]) == 2
    dec.eval()
    with torch.no_grad():
        out = dec(e4, e3)
    assert "aux_outputs" not in out and out["pred_logits"].shape == (2, 6, 4)


def test_gt_attention_mask():
    dec = _tiny_decoder()
    targets = _targets(1, 16, 16)
    matching = [(torch.tensor([4, 1]), torch.tensor([0, 1]))]
    mask = dec._gt_attention_mask(matching, targets, (4, 4), num_queries=6)
    assert mask.shape == (1 * 4, 6 + 2, 16)
    assert torch.equal(mask[0], mask[3])  # same for every head
    m = mask[0].reshape(8, 4, 4)
    expected_q4 = torch.ones(4, 4, dtype=torch.bool)
    expected_q4[:2, :2] = False  # query 4 sees only GT 0 (top-left)
    assert torch.equal(m[4], expected_q4)
    assert not m[1, 2:, 2:].any() and m[1, :2, :2].all()
    for q in (0, 2, 3, 5, 6, 7):  # unmatched IA queries and the aux queries see everything
        assert not m[q].any()
    # a matched query whose GT vanishes at E3 resolution is unblocked, not fully blocked
    tiny = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 16, 16)}]
    mask = dec._gt_attention_mask([(torch.tensor([0]), torch.tensor([0]))], tiny, (4, 4), 6)
    assert not mask.any()


def test_predicted_attention_mask_unblocks_empty_rows():
    dec = _tiny_decoder()
    logits = torch.full((1, 6, 2, 2), -1.0)
    logits[0, 0, 0, 0] = 1.0
    mask = dec._attention_mask(logits)
    assert mask.shape == (4, 8, 4)
    assert mask[0, 0].tolist() == [False, True, True, True]
    assert not mask[0, 1:].any()  # fully blocked rows -> unblocked; aux rows never blocked


def test_positional_embeddings():
    dec = _tiny_decoder(num_queries=100)
    pe = dec.meta_pos_embed.detach()
    assert pe.shape == (1, 32, 10, 10) and torch.isfinite(pe).all()  # official: torch.empty
    assert 0.015 < float(pe.std()) < 0.025 and abs(float(pe.mean())) < 0.005
    assert _tiny_decoder(num_queries=10).meta_pos_embed.shape[-1] == 3  # official tie to N_a
    assert _tiny_decoder(num_queries=10, pos_embed_grid=10).meta_pos_embed.shape[-1] == 10
    sine = _tiny_decoder(pos_embed="sine")
    assert sine.meta_pos_embed is None
    emb = sine.position_embedding((5, 7), torch.zeros(1))
    assert emb.shape == (1, 32, 5, 7) and emb.abs().max() <= 1.0
    sine.eval()
    with torch.no_grad():
        out = sine(torch.randn(1, 32, 3, 4), torch.randn(1, 32, 6, 8))
    assert torch.isfinite(out["pred_masks"]).all()
    with pytest.raises(ValueError, match="pos_embed"):
        _tiny_decoder(pos_embed="rope")


def _cfg(*opts: str):
    cfg = get_cfg()
    merge_config(cfg, os.path.join(REPO, SHAPES_INSTANCE), list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_checkpoint_key_layout():
    model = build_model(_cfg("MODEL.FASTINST.DEC_LAYERS", "3"))
    keys = set(model.state_dict())
    predictor = [
        "meta_pos_embed",
        "empty_query_features.weight",
        "empty_query_pos_embed.weight",
        "query_proposal.conv_proposal_cls_logits.2.weight",
        "transformer_query_cross_attention_layers.2.multihead_attn.in_proj_weight",
        "transformer_query_self_attention_layers.0.self_attn.out_proj.weight",
        "transformer_mask_cross_attention_layers.1.norm.weight",
        "transformer_mask_ffn_layers.2.linear1.weight",
        "decoder_query_norm_layers.3.weight",
        "class_embed_layers.3.layers.2.bias",
        "mask_embed_layers.0.layers.0.weight",
        "mask_features_layers.3.weight",
    ]
    for k in ["sem_seg_head.pixel_decoder.ppm.bottleneck.weight"] + [
        f"sem_seg_head.predictor.{p}" for p in predictor
    ]:
        assert k in keys, k


def test_bad_config_and_inputs_raise_clear_errors():
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("fastinst_test_meta").set(thing_classes=["a", "b", "c"])
    assert _cfg("DATASETS.TRAIN", "('fastinst_test_meta',)").MODEL.NUM_CLASSES == 3
    with pytest.raises(ValueError, match="MODEL.NUM_CLASSES=5 .* 3 thing_classes"):
        _cfg("DATASETS.TRAIN", "('fastinst_test_meta',)", "MODEL.NUM_CLASSES", "5")
    with pytest.raises(ValueError, match="CONVS_DIM"):
        build_model(_cfg("MODEL.SEM_SEG_HEAD.CONVS_DIM", "64"))
    model = build_model(_cfg())
    with pytest.raises(ValueError, match="FastInst expects images"):
        model.eval()([{"image": torch.zeros(64, 64, 3, dtype=torch.uint8)}])
    from detectron2.structures import BitMasks, Instances

    inst = Instances((64, 64))
    inst.gt_classes = torch.tensor([7])
    inst.gt_masks = BitMasks(torch.ones(1, 64, 64, dtype=torch.bool))
    model.train()
    with pytest.raises(ValueError, match="class 7 >= MODEL.NUM_CLASSES"):
        model([{"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "instances": inst}])
