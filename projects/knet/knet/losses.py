"""K-Net's pieces of the shared matching and set criterion.

- :class:`KNetMatcher`: the shared :class:`~common.modeling.matcher.HungarianMatcher` restricted
  to the   learned (thing) kernels and thing classes, plus the fixed 1:1 pairs of the panoptic stuff
  kernels (kernel ``N + i`` <-> stuff class ``T + i``), as ``KernelIterHead`` assigns them.
- ``knet_labels_focal`` (``loss_cls``): sigmoid focal with K-Net's panoptic label weights.
- ``rank`` (``loss_rank``, :class:`RankLoss`) with :func:`knet_rank_targets` and
  :func:`rank_loss`: the panoptic rank loss over all kernels' masks.
- ``knet_semantic_seg`` (``loss_seg``): the stage-0 dense sigmoid focal loss on the semantic
  classifier.

Provenance: ``KernelUpdateHead._get_target_single`` / ``ConvKernelHead.loss`` of
ZwwWayne/K-Net @5e50ee5; its ``[None] * 2`` placeholder bug (A4) is not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from common.modeling.costs import resize_masks
from common.modeling.loss_terms import (
    LossTerm,
    matched_labels,
    register_loss_term,
    src_permutation_idx,
)
from common.modeling.losses import AvgFactor, sigmoid_focal_loss, softmax_ce_loss
from common.modeling.matcher import HungarianMatcher

Indices = list[tuple[Tensor, Tensor]]


class KNetMatcher(nn.Module):
    """Hungarian matching of the first ``num_proposals`` kernels to the thing targets (class
    columns ``:num_thing_classes``), optionally followed by the fixed stuff pairs.

    Targets hold things and stuff together (``labels`` >= ``num_thing_classes`` are stuff, at
    most one target per stuff class).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        *,
        num_proposals: int,
        num_thing_classes: int,
        with_stuff: bool,
    ):
        super().__init__()
        self.matcher = matcher
        self.num_proposals = num_proposals
        self.num_thing_classes = num_thing_classes
        self.with_stuff = with_stuff

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> Indices:
        """
        Args:
            outputs: ``pred_masks`` [B, Q, h, w] (and ``pred_logits`` [B, Q, C]), Q >= N.
            targets: per image ``labels`` [G] and ``masks`` [G, h, w].

        Returns:
            per image (kernel_idx, target_idx) int64 CPU tensors, sorted by kernel.
        """
        n, t = self.num_proposals, self.num_thing_classes
        thing_outputs = {"pred_masks": outputs["pred_masks"][:, :n]}
        if outputs.get("pred_logits") is not None:
            thing_outputs["pred_logits"] = outputs["pred_logits"][:, :n, :t]
        thing_targets, thing_ids = [], []
        for tgt in targets:
            keep = torch.nonzero(tgt["labels"] < t).flatten()
            thing_ids.append(keep.cpu())
            thing_targets.append(
                {**tgt, "labels": tgt["labels"][keep], "masks": tgt["masks"][keep]}
            )
        indices = []
        for (src, j), ids, tgt in zip(
            self.matcher(thing_outputs, thing_targets), thing_ids, targets
        ):
            j = ids[j]
            if self.with_stuff:
                stuff = torch.nonzero(tgt["labels"] >= t).flatten().cpu()
                src = torch.cat([src, tgt["labels"][stuff].cpu() - t + n])
                j = torch.cat([j, stuff])
            indices.append((src.long(), j.long()))
        return indices


@register_loss_term("knet_labels_focal")
class KNetFocalLabelsLoss(LossTerm):
    """``loss_cls``: sigmoid focal on ``pred_logits`` [B, Q, C] with K-Net's label weights,
    sum / ``num_targets`` (all-reduced matched count, stuff included).

    Weights: kernels ``< num_proposals`` see only the thing columns; stuff kernel ``N + i``
    sees only its own column ``T + i`` (so absent stuff is pushed to 0). Without stuff kernels
    (instance mode) all weights are 1, i.e. the shared ``labels_focal`` term.
    """

    keys = ("loss_cls",)
    required_keys = ("pred_logits",)

    def __init__(
        self,
        num_classes: int,
        num_proposals: int = 100,
        num_thing_classes: int = 80,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__(num_classes)
        self.num_proposals = num_proposals
        self.num_thing_classes = num_thing_classes
        self.alpha, self.gamma = alpha, gamma

    def label_weights(self, num_kernels: int, device: torch.device) -> Tensor | None:
        """[Q, C] weights, or None when Q == num_proposals (all ones)."""
        n, t = self.num_proposals, self.num_thing_classes
        if num_kernels <= n:
            return None
        weights = torch.zeros((num_kernels, self.num_classes), device=device)
        weights[:n, :t] = 1.0
        stuff = torch.arange(num_kernels - n, device=device)
        weights[n + stuff, t + stuff] = 1.0
        return weights

    def __call__(self, outputs, targets, indices, num_targets):
        logits = outputs["pred_logits"]
        onehot = torch.zeros_like(logits)
        b_idx, q_idx = src_permutation_idx(indices, logits.device)
        onehot[b_idx, q_idx, matched_labels(targets, indices, logits.device)] = 1.0
        loss = sigmoid_focal_loss(
            logits.float(),
            onehot.float(),
            alpha=self.alpha,
            gamma=self.gamma,
            weight=self.label_weights(logits.shape[1], logits.device),
            avg_factor=num_targets,
        )
        return {"loss_cls": loss}


@register_loss_term("knet_semantic_seg")
class KNetSemanticSegLoss(LossTerm):
    """``loss_seg`` (stage 0): sigmoid focal on ``pred_seg`` [B, C, h, w] against a dense label
    map: stuff target masks (> 0) first, then the matched thing masks in kernel order; other
    pixels are background (all-zero one-hot). Divided by the number of this worker's
    foreground pixels (>= 1), as the official head (not all-reduced).
    """

    keys = ("loss_seg",)
    required_keys = ("pred_seg",)

    def __init__(
        self, num_classes: int, num_thing_classes: int = 80, alpha: float = 0.25, gamma: float = 2.0
    ):
        super().__init__(num_classes)
        self.num_thing_classes = num_thing_classes
        self.alpha, self.gamma = alpha, gamma

    def dense_labels(self, targets, indices, size: tuple[int, int], device) -> Tensor:
        """[B, h, w] long, ``num_classes`` = background."""
        out = torch.full((len(targets), *size), self.num_classes, dtype=torch.long, device=device)
        for b, (tgt, (_, j)) in enumerate(zip(targets, indices)):
            labels, masks = tgt["labels"].to(device), tgt["masks"].to(device)
            if tuple(masks.shape[-2:]) != tuple(size):
                raise ValueError(f"targets are {tuple(masks.shape[-2:])}, predictions {size}")
            for g in torch.nonzero(labels >= self.num_thing_classes).flatten().tolist():
                out[b][masks[g] > 0] = labels[g]
            for g in j.tolist():
                out[b][masks[g] > 0] = labels[g]
        return out

    def __call__(self, outputs, targets, indices, num_targets):
        seg = outputs["pred_seg"]
        labels = self.dense_labels(targets, indices, tuple(seg.shape[-2:]), seg.device)
        fg = labels < self.num_classes
        onehot = torch.zeros_like(seg, dtype=torch.float32)
        b_idx, y_idx, x_idx = torch.nonzero(fg, as_tuple=True)
        onehot[b_idx, labels[fg], y_idx, x_idx] = 1.0
        loss = sigmoid_focal_loss(
            seg.float(),
            onehot,
            alpha=self.alpha,
            gamma=self.gamma,
            avg_factor=float(max(int(fg.sum()), 1)),
        )
        return {"loss_seg": loss}


def knet_rank_targets(mask_targets: Tensor, ignore_index: int = 255) -> Tensor:
    """K-Net rank targets: for each pixel, the index of the kernel whose target mask covers it.

    A pixel is covered by kernel j if ``mask_targets[j] > 0`` (K-Net casts its soft targets to
    bool). Where several kernels cover a pixel the highest index wins (K-Net assigns in kernel
    order, later ones overwrite). Uncovered pixels get ``ignore_index``.

    Args:
        mask_targets: [..., N, H, W] per-kernel targets (zeros for unmatched kernels).

    Returns:
        [..., H, W] long.
    """
    covered = mask_targets > 0
    num = covered.shape[-3]
    if num == 0:
        shape = covered.shape[:-3] + covered.shape[-2:]
        best = torch.zeros(shape, dtype=torch.long, device=covered.device)
    else:
        order = torch.arange(1, num + 1, device=covered.device).view(num, 1, 1)
        best = (covered.long() * order).amax(dim=-3)
    best = best - 1
    return torch.where(best >= 0, best, torch.full_like(best, ignore_index))


def rank_loss(
    mask_logits: Tensor,
    rank_targets: Tensor,
    *,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """K-Net rank loss: softmax cross-entropy over the kernel dimension at every pixel.

    With ``reduction="mean"`` and no ``avg_factor`` the sum over covered pixels is divided by
    the number of ALL pixels (mmdet 2.x CrossEntropyLoss with ``ignore_index``, as K-Net uses
    it), or by the number of non-ignored pixels if ``avg_non_ignore``.

    Args:
        mask_logits: [B, N, H, W] mask logits of all kernels.
        rank_targets: [B, H, W] long from :func:`knet_rank_targets`.

    Returns:
        [B, H, W] for "none", else a 0-d tensor.
    """
    logits = mask_logits.permute(0, 2, 3, 1)
    if reduction == "mean" and avg_factor is None and not avg_non_ignore:
        avg_factor = max(rank_targets.numel(), 1)
    return softmax_ce_loss(
        logits,
        rank_targets,
        ignore_index=ignore_index,
        reduction=reduction,
        avg_factor=avg_factor,
    )


@register_loss_term("rank")
class RankLoss(LossTerm):
    """``loss_rank`` (K-Net panoptic): per-pixel softmax CE over ALL kernels' masks; a pixel's
    target is the kernel whose matched (resized) GT mask is > 0 there, others ignored; mean over
    all pixels (mmdet 2.x) unless ``avg_non_ignore``."""

    keys = ("loss_rank",)
    required_keys = ("pred_masks",)

    def __init__(self, num_classes: int, ignore_index: int = 255, avg_non_ignore: bool = False):
        super().__init__(num_classes)
        self.ignore_index, self.avg_non_ignore = ignore_index, avg_non_ignore

    def __call__(self, outputs, targets, indices, num_targets):
        masks = outputs["pred_masks"]
        size = tuple(masks.shape[-2:])
        rank_targets = []
        for t, (src, tgt) in zip(targets, indices):
            per_kernel = torch.zeros((masks.shape[1], *size), device=masks.device)
            resized = resize_masks(t["masks"][tgt.to(t["masks"].device)], size)
            per_kernel[src.to(masks.device)] = resized.to(masks.device)
            rank_targets.append(knet_rank_targets(per_kernel, self.ignore_index))
        loss = rank_loss(
            masks.float(),
            torch.stack(rank_targets),
            ignore_index=self.ignore_index,
            avg_non_ignore=self.avg_non_ignore,
        )
        return {"loss_rank": loss}
