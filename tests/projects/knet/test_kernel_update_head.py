"""K-Net's kernel update head against hand-computed values on tiny cases: the gates of the
adaptive kernel update, hard and soft group feature assembling, the chunked update of kernels
wider than the updator (512 -> 2 x 256 in the official semantic configs), and the dynamic mask
prediction."""

from __future__ import annotations

import math

import pytest
import torch
from knet.kernel_update_head import KernelUpdateHead, KernelUpdator

TOL = 1e-5


def ln2(a: float, b: float) -> list[float]:
    """LayerNorm (eps 1e-5, no affine) of the 2-vector (a, b): (+-d) / sqrt(d^2 + eps), d = (a-b)/2,
    i.e. (1, -1) when a > b, up to eps."""
    d = (a - b) / 2
    return [d / math.sqrt(d * d + 1e-5), -d / math.sqrt(d * d + 1e-5)]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_case(f: list[float], k: list[float]) -> dict:
    """The hand derivation of :func:`hand_updator` for F = f, K = k (see the cases below)."""
    gate = [f[0] * k[0], f[1] * k[1]]
    update_gate = [sig(v) for v in ln2(*gate)]
    input_gate = [sig(v) for v in ln2(-gate[0], -gate[1])]
    f_out = [w * v for w, v in zip((2.0, 1.0), ln2(*f))]
    k_out = [w * v for w, v in zip((1.0, 3.0), ln2(*k))]
    gated = [update_gate[i] * f_out[i] + input_gate[i] * k_out[i] for i in range(2)]
    return {"F": f, "K": k, "gated": gated, "out": [max(v, 0.0) for v in ln2(*gated)]}


SIG1, SIGM1 = sig(1.0), sig(-1.0)  # 0.731059, 0.268941


def hand_updator() -> KernelUpdator:
    """2-d updator whose layers are identities/sign flips, so every step is computable by hand:
    F_in = F_out = F, K_in = K_out = K, input gate uses -gate, LN(F_out) is scaled by (2, 1) and
    LN(K_out) by (1, 3)."""
    up = KernelUpdator(in_channels=2, feat_channels=2, out_channels=2)
    eye = torch.eye(2)
    with torch.no_grad():
        for p in up.parameters():
            p.zero_()
        up.dynamic_layer.weight.copy_(torch.cat([eye, eye]))
        up.input_layer.weight.copy_(torch.cat([eye, eye]))
        up.update_gate.weight.copy_(eye)
        up.input_gate.weight.copy_(-eye)
        up.fc_layer.weight.copy_(eye)
        for ln in (up.norm_in, up.input_norm_in, up.fc_norm):
            ln.weight.fill_(1.0)
        up.norm_out.weight.copy_(torch.tensor([2.0, 1.0]))
        up.input_norm_out.weight.copy_(torch.tensor([1.0, 3.0]))
    return up


# F = (3, 1), K = (1, 2): gate = F*K = (3, 2) -> LN = (1, -1) -> update gate (s1, s-1);
# input gate from -gate -> LN = (-1, 1) -> (s-1, s1). LN(F)*(2, 1) = (2, -1),
# LN(K)*(1, 3) = (-1, 3). new = (2 s1 - s-1, -s-1 + 3 s1) = (1.1932, 1.9242);
# LN(new) = (-1, 1) -> ReLU (0, 1).   (s1 = sigmoid(1), s-1 = sigmoid(-1); "=" up to LN's eps)
CASE_A = hand_case([3.0, 1.0], [1.0, 2.0])
# F = (1, 3), K = (2, 1): gate = (2, 3) -> LN = (-1, 1) -> update gate (s-1, s1); input gate
# (s1, s-1). LN(F)*(2, 1) = (-2, 1), LN(K)*(1, 3) = (1, -3).
# new = (-2 s-1 + s1, s1 - 3 s-1) = (0.1932, -0.0758); LN -> (1, -1) -> ReLU (1, 0).
CASE_B = hand_case([1.0, 3.0], [2.0, 1.0])


def test_hand_cases_match_the_rounded_derivation():
    approx = {"abs": 2e-3}
    assert CASE_A["gated"] == pytest.approx([2 * SIG1 - SIGM1, -SIGM1 + 3 * SIG1], **approx)
    assert CASE_A["out"] == pytest.approx([0.0, 1.0], **approx)
    assert CASE_B["gated"] == pytest.approx([-2 * SIGM1 + SIG1, SIG1 - 3 * SIGM1], **approx)
    assert CASE_B["out"] == pytest.approx([1.0, 0.0], **approx)


@pytest.mark.parametrize("case", [CASE_A, CASE_B], ids=["A", "B"])
def test_adaptive_kernel_update_gates_by_hand(case):
    up = hand_updator()
    feats = torch.tensor([case["F"]])
    kernels = torch.tensor([[case["K"]]])
    gated = up.gated_sum(feats, kernels)
    assert gated.shape == (1, 1, 2)
    torch.testing.assert_close(gated[0, 0], torch.tensor(case["gated"]), atol=TOL, rtol=0)
    out = up(feats, kernels)
    torch.testing.assert_close(out[0, 0], torch.tensor(case["out"]), atol=TOL, rtol=0)


def test_wide_kernels_are_updated_as_independent_chunks():
    """A 4-d kernel with a 2-d updator: halves (A, B) give (out_A, out_B) = (0, 1, 1, 0); swapping
    the halves swaps the outputs (the official 512 -> 2 x 256 reshape)."""
    up = hand_updator()
    feats = torch.tensor([[CASE_A["F"] + CASE_B["F"]]])  # [B=1, N=1, 4]
    kernels = torch.tensor([[[CASE_A["K"] + CASE_B["K"]]]])  # [B=1, N=1, K2=1, 4]
    out = up(feats, kernels)
    assert out.shape == (2, 1, 2)  # 2 chunks of 2 channels
    expected = torch.tensor(CASE_A["out"] + CASE_B["out"])
    torch.testing.assert_close(out.reshape(-1), expected, atol=TOL, rtol=0)
    swapped = up(feats[..., [2, 3, 0, 1]], kernels[..., [2, 3, 0, 1]])
    torch.testing.assert_close(swapped.reshape(-1), expected[[2, 3, 0, 1]], atol=TOL, rtol=0)


def test_hard_mask_assembling_by_hand():
    head = KernelUpdateHead(
        num_classes=3,
        in_channels=2,
        num_heads=1,
        feedforward_channels=4,
        updator_channels=2,
        hard_mask_thr=0.5,
    )
    # X[c] over a 2x2 map; mask logits: sigmoid > 0.5 where logit > 0
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])
    logits = torch.tensor([[[[2.0, -2.0], [0.5, -0.1]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    f = head.assemble(x, logits)
    # kernel 0 selects pixels (0,0) and (1,0): (1 + 3, 10 + 30); kernel 1 selects none
    torch.testing.assert_close(f, torch.tensor([[[4.0, 40.0], [0.0, 0.0]]]))
    # a coarser mask is upsampled bilinearly to the feature size first: one logit of 1 -> all
    f = head.assemble(x, torch.tensor([[[[1.0]], [[-1.0]]]]))
    torch.testing.assert_close(f, torch.tensor([[[10.0, 100.0], [0.0, 0.0]]]))


def test_soft_mask_assembling_by_hand():
    head = KernelUpdateHead(
        num_classes=2,
        in_channels=2,
        num_heads=1,
        feedforward_channels=4,
        updator_channels=2,
        hard_mask_thr=None,
        with_cls=False,
    )
    x = torch.tensor([[[[1.0, 2.0]], [[10.0, 20.0]]]])  # [1, 2, 1, 2]
    # pixel 0: logits (log 3, 0) -> softmax (3/4, 1/4); pixel 1: (0, 0) -> (1/2, 1/2)
    logits = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, 0.0]]]])
    f = head.assemble(x, logits)
    expected = torch.tensor(
        [[[0.75 * 1 + 0.5 * 2, 0.75 * 10 + 0.5 * 20], [0.25 * 1 + 0.5 * 2, 0.25 * 10 + 0.5 * 20]]]
    )
    torch.testing.assert_close(f, expected)


def test_dynamic_mask_prediction_and_shapes():
    """New masks = per-image 1x1 conv of X with the kernels made by fc_mask; K = 3 uses the
    per-image F.conv2d path and must agree with unfold."""
    torch.manual_seed(0)
    for k in (1, 3):
        head = KernelUpdateHead(
            num_classes=5,
            in_channels=8,
            conv_kernel_size=k,
            num_heads=2,
            feedforward_channels=16,
            updator_channels=8,
        )
        head.eval()
        feats, kernels = torch.randn(2, 8, 6, 7), torch.randn(2, 4, 8, k, k)
        masks = torch.randn(2, 4, 3, 4)
        cls, new_masks, new_kernels = head(feats, kernels, masks)
        assert cls.shape == (2, 4, 5) and new_masks.shape == (2, 4, 6, 7)
        assert new_kernels.shape == (2, 4, 8, k, k)
        # recompute the masks from the returned object features
        x = head.feat_transform(feats)
        obj = new_kernels.reshape(2, 4, 8, -1).permute(0, 1, 3, 2)
        dyn = head.fc_mask(head.mask_fcs(obj)).permute(0, 1, 3, 2).reshape(2, 4, 8 * k * k)
        cols = torch.nn.functional.unfold(x, k, padding=k // 2)  # [2, 8*k*k, 42]
        ref = torch.einsum("bnc,bcl->bnl", dyn, cols).reshape(2, 4, 6, 7)
        torch.testing.assert_close(new_masks, ref, atol=1e-4, rtol=1e-4)


def test_semantic_head_has_no_classifier_and_keeps_width():
    head = KernelUpdateHead(
        num_classes=4,
        in_channels=8,
        num_heads=2,
        feedforward_channels=16,
        updator_channels=4,
        hard_mask_thr=None,
        with_cls=False,
    )
    cls, masks, kernels = head(
        torch.randn(1, 8, 5, 5), torch.randn(1, 4, 8, 1, 1), torch.randn(1, 4, 5, 5)
    )
    assert cls is None and masks.shape == (1, 4, 5, 5) and kernels.shape == (1, 4, 8, 1, 1)
    assert not hasattr(head, "fc_cls")
    with pytest.raises(ValueError, match="multiple of updator_channels"):
        KernelUpdateHead(in_channels=6, updator_channels=4)
