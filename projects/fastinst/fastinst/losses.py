"""FastInst's own matching and loss terms, registered into common's registries on import.

- cost ``location`` (:class:`LocationCost`): the query's selection location inside the GT mask;
- cost ``proposal_location`` (:class:`ProposalLocationCost`) with :func:`proposal_match_outputs`:
  the dense proposal matching (rows = all pixels of the proposal map);
- loss ``proposals`` (:class:`ProposalLoss`): ``loss_proposal``, the pixel-wise proposal
  classification with its own dense matcher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from common.modeling.costs import CostTerm, register_cost_term
from common.modeling.loss_terms import (
    LossTerm,
    matched_labels,
    register_loss_term,
    src_permutation_idx,
)
from common.modeling.losses import softmax_ce_loss
from common.modeling.matcher import HungarianMatcher
from common.modeling.point_sampling import sample_channels_at_points

__all__ = ["LocationCost", "ProposalLocationCost", "ProposalLoss", "proposal_match_outputs"]


def proposal_match_outputs(proposal_cls_logits: Tensor) -> dict[str, Any]:
    """Prediction dict for FastInst's dense proposal matching (rows = all pixels of the map).

    Use with ``HungarianMatcher([("softmax_class", 2.0), ("proposal_location", 1000.0)])``.

    Args:
        proposal_cls_logits: [B, K, H, W] proposal class logits (K = C + 1).

    Returns:
        ``{"pred_logits": [B, H*W, K] (row-major pixels), "proposal_size": (H, W)}``; the matched
        row index r is pixel (r // W, r % W).
    """
    b, k, h, w = proposal_cls_logits.shape
    return {
        "pred_logits": proposal_cls_logits.flatten(2).transpose(1, 2),
        "proposal_size": (h, w),
    }


@register_cost_term("location")
class LocationCost(CostTerm):
    """FastInst location cost: -1 where the GT mask, bilinearly point-sampled at the query's
    normalised (x, y) selection location (``pred_locations``), is > 0; else 0 (weight 1000)."""

    required_keys = ("pred_locations",)

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        loc = pred["pred_locations"]
        masks = target["masks"].to(loc.device, torch.float32)
        inside = sample_channels_at_points(masks, loc) > 0  # [G, Q]
        return -inside.T.to(loc.dtype)


@register_cost_term("proposal_location")
class ProposalLocationCost(CostTerm):
    """FastInst proposal-map location cost: rows are the H*W pixels of a proposal map
    (``pred["proposal_size"] = (H, W)``, row-major); -1 where the GT mask adaptive-avg-pooled to
    H x W is > 0. Build the prediction dict with :func:`proposal_match_outputs`."""

    required_keys = ("proposal_size",)

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        size = tuple(int(s) for s in pred["proposal_size"])
        masks = target["masks"].float()
        if masks.shape[0] == 0:
            return masks.new_zeros((size[0] * size[1], 0))
        pooled = F.adaptive_avg_pool2d(masks[None], size)[0]
        return -(pooled.flatten(1) > 0).T.float()


@register_loss_term("proposals")
class ProposalLoss(LossTerm):
    """FastInst ``loss_proposal``: softmax CE over C+1 at every pixel of
    ``proposal_cls_logits`` [B, C+1, H, W]; pixels matched to a GT by the dense proposal matcher
    (class 2 + location 1000, see :func:`proposal_match_outputs`) get its class,
    all others background (C); plain mean, no class weights. Ignores the criterion's
    ``indices`` (the proposal matching is its own)."""

    keys = ("loss_proposal",)
    required_keys = ("proposal_cls_logits",)

    def __init__(
        self, num_classes: int, class_weight: float = 2.0, location_weight: float = 1000.0
    ):
        super().__init__(num_classes)
        self.matcher = HungarianMatcher(
            [("softmax_class", class_weight), ("proposal_location", location_weight)]
        )

    def __call__(self, outputs, targets, indices, num_targets):
        logits = outputs["proposal_cls_logits"]
        proposal_indices = self.matcher(proposal_match_outputs(logits), targets)
        flat = logits.flatten(2).transpose(1, 2).float()  # [B, HW, C+1]
        classes = torch.full(flat.shape[:2], self.num_classes, dtype=torch.int64)
        classes = classes.to(logits.device)
        b_idx, q_idx = src_permutation_idx(proposal_indices, logits.device)
        labels = matched_labels(targets, proposal_indices, logits.device)
        classes[b_idx, q_idx] = labels
        return {"loss_proposal": softmax_ce_loss(flat, classes, ignore_index=-1)}
