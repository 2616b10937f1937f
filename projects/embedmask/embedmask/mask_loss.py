"""EmbedMask mask losses: positive-proposal sampling, Lovász hinge on logit(p), smooth loss.

Provenance: EmbedMask v2 ``EmbedMaskLossComputation`` (single best positive per GT, Lovász on the
whole stride-4 map, weight 0.5, a zero-weighted term on every embedding output for DDP), with the
paper/v1 sampling (mean of IoU > 0.5 positives, smooth loss, box-padded crop) and AdelaiDet's
"every positive" sampling as options. Differences: the GT masks are sampled at the stride-4 pixel
centres (AdelaiDet) instead of v2's bilinear resize thresholded at > 0; logit(p) is computed as
-d - log(1 - exp(-d)) (stable, same value as v2's clamped log p - log(1 - p)).
"""

from __future__ import annotations

import math

import torch
from detectron2.structures import Instances
from torch import Tensor

from common.modeling.losses import lovasz_hinge

from .embed_head import mask_log_probability
from .fcos import ltrb_to_boxes

SAMPLINGS = ("best", "iou_mean", "all")
#: p is clamped to [PROB_EPS, 1 - PROB_EPS] before the logit (v2: 1e-9).
PROB_EPS = 1e-9
#: logit given to pixels outside the loss crop: sorted last by Lovász, so exactly ignored.
_IGNORED_LOGIT = -1e4


def aligned_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of aligned xyxy boxes [N, 4], [N, 4] -> [N]."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=1e-6)


def logit_from_log_probability(log_prob: Tensor, eps: float = PROB_EPS) -> Tensor:
    """logit(p) = log p - log(1 - p) for log p = -d, with p clamped to [eps, 1 - eps].

    Args:
        log_prob: [...] log-probabilities (<= 0).

    Returns:
        [...] logits in [logit(eps), logit(1 - eps)].
    """
    d = (-log_prob).clamp(min=-math.log1p(-eps), max=-math.log(eps))
    return -d - torch.log(-torch.expm1(-d))


def sample_gt_masks(inst: Instances, grid_hw: tuple[int, int], stride: int) -> Tensor:
    """GT masks at the centres of a stride-``stride`` grid over the padded input.

    Returns:
        [G, H_grid, W_grid] bool; pixels beyond the unpadded image are False.
    """
    masks = inst.gt_masks.tensor
    h, w = masks.shape[-2:]
    ys = torch.arange(grid_hw[0], device=masks.device) * stride + stride // 2
    xs = torch.arange(grid_hw[1], device=masks.device) * stride + stride // 2
    sampled = masks[:, ys.clamp(max=h - 1)][:, :, xs.clamp(max=w - 1)]
    valid = (ys < h)[:, None] & (xs < w)[None, :]
    return sampled & valid


class EmbedMaskLoss:
    """Mask loss (and optional smooth loss) of EmbedMask; holds no parameters."""

    def __init__(
        self,
        *,
        positive_sampling: str = "best",
        sample_pos_iou_th: float = 0.5,
        max_proposals: int = 500,
        box_padding: float = -1.0,
        loss_mask_alpha: float = 0.5,
        loss_smooth_alpha: float = 0.0,
        inclusive_boxes: bool = False,
    ):
        """
        Args:
            positive_sampling: "best" | "iou_mean" | "all" (see ``MODEL.EMBEDMASK``).
            sample_pos_iou_th: IoU threshold of "iou_mean".
            max_proposals: random cap on the positives of a batch for "all".
            box_padding: loss only inside the GT box enlarged by this ratio; < 0: whole map.
            loss_mask_alpha, loss_smooth_alpha: weights (the smooth loss needs "iou_mean").
            inclusive_boxes: the predicted boxes are maskrcnn-benchmark inclusive pixel boxes
                (``MODEL.FCOS.BOX_CONVENTION``); their IoU with the GT uses its "+1" widths.
        """
        if positive_sampling not in SAMPLINGS:
            raise ValueError(
                f"MODEL.EMBEDMASK.POSITIVE_SAMPLING must be one of {SAMPLINGS}, "
                f"got {positive_sampling!r}"
            )
        if loss_smooth_alpha > 0 and positive_sampling != "iou_mean":
            raise ValueError(
                "MODEL.EMBEDMASK.LOSS_SMOOTH_ALPHA > 0 needs POSITIVE_SAMPLING iou_mean"
            )
        self.positive_sampling = positive_sampling
        self.sample_pos_iou_th = sample_pos_iou_th
        self.max_proposals = max_proposals
        self.box_padding = box_padding
        self.loss_mask_alpha = loss_mask_alpha
        self.loss_smooth_alpha = loss_smooth_alpha
        self.inclusive_boxes = inclusive_boxes

    # ---- sampling --------------------------------------------------------------------------
    def select_positives(
        self, pos_idx: Tensor, pos_gt: Tensor, ious: Tensor, num_gt: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Which positive locations represent which GT instance in the mask loss.

        Args:
            pos_idx: [Np] location indices of the FCOS positives of one image.
            pos_gt: [Np] their GT indices; ious: [Np] IoU of their predicted box with that GT.
            num_gt: G.

        Returns:
            (loc_idx [M], group [M], inst_gt [K]): the selected locations, the output instance
            (0..K-1) each belongs to, and each output instance's GT index. "best": one location
            per GT with a positive; "iou_mean": all with IoU > th, or the best if none passes;
            "all": each positive is its own instance.
        """
        device = pos_idx.device
        if self.positive_sampling == "all":
            return pos_idx, torch.arange(pos_idx.numel(), device=device), pos_gt
        best_iou = torch.full((num_gt,), -1.0, device=device)
        best_iou = best_iou.scatter_reduce(0, pos_gt, ious, reduce="amax")
        order = torch.arange(pos_idx.numel(), device=device)
        first = torch.where(
            ious == best_iou[pos_gt], order, torch.full_like(order, pos_idx.numel())
        )
        chosen = torch.full((num_gt,), pos_idx.numel(), device=device, dtype=torch.long)
        chosen = chosen.scatter_reduce(0, pos_gt, first, reduce="amin")
        has_pos = chosen < pos_idx.numel()
        inst_gt = torch.nonzero(has_pos).squeeze(1)
        gt_to_inst = torch.cumsum(has_pos.long(), 0) - 1
        if self.positive_sampling == "best":
            keep = chosen[inst_gt]
        else:
            is_best = torch.zeros(pos_idx.numel() + 1, dtype=torch.bool, device=device)
            is_best[chosen] = True
            keep = torch.nonzero((ious > self.sample_pos_iou_th) | is_best[:-1]).squeeze(1)
        return pos_idx[keep], gt_to_inst[pos_gt[keep]], inst_gt

    # ---- loss ------------------------------------------------------------------------------
    def __call__(
        self,
        pixel_embed: Tensor,
        proposal_embed: Tensor,
        margin: Tensor,
        fcos_outputs: dict,
        fcos_targets: dict[str, Tensor],
        gt_instances: list[Instances],
        stride: int,
    ) -> dict[str, Tensor]:
        """
        Args:
            pixel_embed: [B, D, H', W'] pixel embeddings at stride ``stride`` of the padded input.
            proposal_embed, margin: [B, L, D] at every FCOS location.
            fcos_outputs: :meth:`FCOS.forward` dict ("bbox_reg", "locations", "strides").
            fcos_targets: :meth:`FCOS.get_targets` dict ("gt_inds").
            gt_instances: per image, gt_boxes [G, 4] and gt_masks BitMasks in the input frame.
            stride: stride of ``pixel_embed`` (P3 stride / MASK_SCALE_FACTOR).

        Returns:
            {"loss_mask"} (and {"loss_smooth"} when its weight is > 0): weighted 0-d tensors.
        """
        num_images, _, grid_h, grid_w = pixel_embed.shape
        gt_inds = fcos_targets["gt_inds"]
        with torch.no_grad():
            pred_boxes = ltrb_to_boxes(
                fcos_outputs["locations"][None],
                fcos_outputs["bbox_reg"].detach() * fcos_outputs["strides"][None, :, None],
            )
            if self.inclusive_boxes:  # v2's boxlist_iou on inclusive boxes: x2 - x1 + 1 widths
                pred_boxes = torch.cat([pred_boxes[..., :2], pred_boxes[..., 2:] + 1], dim=-1)
        cap = self._cap_mask(gt_inds) if self.positive_sampling == "all" else None
        # zero-weighted term on every embedding output: DDP sees all parameters used (v2)
        loss_mask = 0.0 * (pixel_embed.sum() + proposal_embed.sum() + margin.sum())
        loss_smooth = loss_mask.clone()
        for i, inst in enumerate(gt_instances):
            pos_idx = torch.nonzero(gt_inds[i] >= 0).squeeze(1)
            if cap is not None:
                pos_idx = pos_idx[cap[i, pos_idx]]
            if pos_idx.numel() == 0:
                continue
            pos_gt = gt_inds[i, pos_idx]
            boxes = inst.gt_boxes.tensor.to(pos_idx.device)
            ious = aligned_iou(pred_boxes[i, pos_idx], boxes[pos_gt])
            loc_idx, group, inst_gt = self.select_positives(pos_idx, pos_gt, ious, len(boxes))
            num_inst = inst_gt.numel()
            counts = torch.zeros(num_inst, device=group.device).index_add_(
                0, group, torch.ones_like(group, dtype=torch.float)
            )[:, None]
            q_all, m_all = proposal_embed[i, loc_idx], margin[i, loc_idx]
            q = q_all.new_zeros(num_inst, q_all.shape[1]).index_add_(0, group, q_all) / counts
            m = m_all.new_zeros(num_inst, m_all.shape[1]).index_add_(0, group, m_all) / counts
            e = pixel_embed[i].flatten(1).t()  # [P, D]
            logits = logit_from_log_probability(mask_log_probability(e, q, m))  # [K, P]
            labels = sample_gt_masks(inst, (grid_h, grid_w), stride)[inst_gt].flatten(1)
            if self.box_padding >= 0:
                inside = self._crop(boxes[inst_gt], (grid_h, grid_w), stride).flatten(1)
                logits = torch.where(inside, logits, torch.full_like(logits, _IGNORED_LOGIT))
                labels = labels & inside
            loss_mask = loss_mask + lovasz_hinge(logits, labels.to(logits.dtype))
            if self.loss_smooth_alpha > 0:
                spread = ((q_all - q[group]) ** 2).sum(1) + ((m_all - m[group]) ** 2).sum(1)
                per_inst = spread.new_zeros(num_inst).index_add_(0, group, spread)
                loss_smooth = loss_smooth + per_inst.mean()
        out = {"loss_mask": loss_mask / num_images * self.loss_mask_alpha}
        if self.loss_smooth_alpha > 0:
            out["loss_smooth"] = loss_smooth / num_images * self.loss_smooth_alpha
        return out

    def _cap_mask(self, gt_inds: Tensor) -> Tensor:
        """[B, L] bool: a random subset of at most ``max_proposals`` positives of the batch."""
        pos = gt_inds >= 0
        flat = torch.nonzero(pos.flatten()).squeeze(1)
        if flat.numel() <= self.max_proposals:
            return pos
        keep = flat[torch.randperm(flat.numel(), device=flat.device)[: self.max_proposals]]
        mask = torch.zeros_like(pos.flatten())
        mask[keep] = True
        return mask.view_as(pos)

    def _crop(self, boxes: Tensor, grid_hw: tuple[int, int], stride: int) -> Tensor:
        """[K, H', W'] bool: grid centres inside each box enlarged by ``box_padding`` per side."""
        wh = boxes[:, 2:] - boxes[:, :2]
        lo = boxes[:, :2] - wh * self.box_padding
        hi = boxes[:, 2:] + wh * self.box_padding
        ys = torch.arange(grid_hw[0], device=boxes.device) * stride + stride // 2
        xs = torch.arange(grid_hw[1], device=boxes.device) * stride + stride // 2
        in_y = (ys[None] >= lo[:, 1:2]) & (ys[None] <= hi[:, 1:2])
        in_x = (xs[None] >= lo[:, 0:1]) & (xs[None] <= hi[:, 0:1])
        return in_y[:, :, None] & in_x[:, None, :]
