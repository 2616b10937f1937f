"""QueryInst's mask loss term for the shared :class:`common.modeling.criterion.SetCriterion`.

Provenance: follows ``DynamicMaskHead.loss`` + mmdet ``mask_target``: the GT bitmap of each
matched target is cropped and resized to 28x28 with aligned RoIAlign on the matched query's refined
(detached) box, binarised at 0.5, and compared with the sigmoid of the logit channel of the GT
class by the squared-denominator dice loss (eps 1e-5), summed and divided by the all-reduced number
of positives. Differences: none (the shared ``dice_loss`` applies the sigmoid once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from detectron2.structures import BitMasks
from torch import Tensor

from common.modeling.criterion import LossTerm, register_loss_term
from common.modeling.losses import dice_loss, loss_precision

__all__ = ["RoIMaskDiceLoss", "roi_mask_targets"]


def roi_mask_targets(
    targets: Sequence[Mapping[str, Any]],
    indices: Sequence[tuple[Tensor, Tensor]],
    pred_boxes: Tensor,
    mask_size: int,
) -> Tensor:
    """RoI mask targets of the matched queries (Detectron2 ``BitMasks.crop_and_resize``).

    Args:
        targets: B dicts with ``masks`` [G_b, H, W] (bool or {0, 1}; pixel frame of the input).
        indices: B tuples (query_idx [M_b], target_idx [M_b]).
        pred_boxes: [B, N, 4] absolute xyxy predicted boxes (the RoIs; detached here).
        mask_size: side of the targets (28).

    Returns:
        [M, mask_size, mask_size] float {0, 1}, in :func:`src_permutation_idx` order.
    """
    out = []
    for b, (t, (src, tgt)) in enumerate(zip(targets, indices)):
        if src.numel() == 0:
            continue
        masks = t["masks"]
        gt = BitMasks(masks[tgt.to(masks.device)].bool())
        rois = pred_boxes[b, src.to(pred_boxes.device)].detach().to(masks.device)
        # mmdet's mask_target clips the RoIs to the GT bitmap (the padded batch frame) before
        # cropping; the logits were predicted in the unclipped RoIs, as there
        height, width = masks.shape[-2:]
        rois = torch.stack(
            [rois[:, 0].clamp(0, width), rois[:, 1].clamp(0, height),
             rois[:, 2].clamp(0, width), rois[:, 3].clamp(0, height)], dim=1,
        )  # fmt: skip
        out.append(gt.crop_and_resize(rois, mask_size).float())
    if not out:
        return pred_boxes.new_zeros((0, mask_size, mask_size), dtype=torch.float32)
    return torch.cat(out).to(pred_boxes.device, loss_precision(pred_boxes).dtype)


@register_loss_term("roi_mask_dice")
class RoIMaskDiceLoss(LossTerm):
    """``loss_mask``: dice between the matched queries' GT-class RoI mask logits
    (``pred_roi_masks`` [M, S, S], :func:`src_permutation_idx` order) and
    :func:`roi_mask_targets` on ``pred_boxes``; squared denominator, sum / ``num_targets``."""

    keys = ("loss_mask",)
    required_keys = ("pred_roi_masks", "pred_boxes")

    def __init__(self, num_classes: int, eps: float = 1e-5):
        super().__init__(num_classes)
        self.eps = eps

    def __call__(self, outputs, targets, indices, num_targets):
        logits = outputs["pred_roi_masks"]
        num = sum(int(src.numel()) for src, _ in indices)
        if logits.shape[0] != num:
            raise ValueError(f"{logits.shape[0]} RoI mask logits for {num} matched queries")
        mask_targets = roi_mask_targets(targets, indices, outputs["pred_boxes"], logits.shape[-1])
        loss = dice_loss(
            loss_precision(logits),
            mask_targets,
            form="squared",
            eps=self.eps,
            from_logits=True,
            avg_factor=num_targets,
        )
        return {"loss_mask": loss}
