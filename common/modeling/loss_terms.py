"""Loss terms for :class:`common.modeling.criterion.SetCriterion`, registered by name.

A loss term is a callable ``term(outputs, targets, indices, num_targets) -> {key: loss}``:

- ``outputs``: ONE prediction dict (final, aux or stage) with batched tensors
  (``pred_logits`` [B, Q, K], ``pred_masks`` [B, Q, h, w], ``pred_boxes`` [B, Q, 4], ...);
- ``targets``: B per-image dicts (``labels`` [G], ``masks`` [G, H, W], ``boxes`` [G, 4],
  ``image_size`` (h, w));
- ``indices``: B tuples ``(query_idx [M_b], target_idx [M_b])`` from the matcher;
- ``num_targets``: the all-reduced normaliser (float >= 1) computed by the criterion.

Keys are unsuffixed (``loss_ce``); the criterion adds ``_<i>``/``_s<stage>`` and the weights.
Subclass :class:`LossTerm` and decorate with ``@register_loss_term("name")`` to add one (e.g. a
method-specific term); ``keys`` must list every key it returns so the criterion can check the
weights at construction.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from common.modeling.costs import resize_masks
from common.modeling.losses import (
    bce_with_logits_loss,
    dice_loss,
    giou_loss,
    l1_box_loss,
    loss_precision,
    normalize_boxes,
    sigmoid_focal_loss,
    softmax_ce_loss,
)
from common.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = [
    "LOSS_TERMS",
    "LossTerm",
    "register_loss_term",
    "build_loss_term",
    "src_permutation_idx",
    "matched_labels",
    "matched_target_masks",
    "sample_matched_target_masks",
    "FocalLabelsLoss",
    "SoftmaxLabelsLoss",
    "PointMaskLoss",
    "DenseMaskBCELoss",
    "DenseMaskDiceLoss",
    "BoxLoss",
]

Indices = Sequence[tuple[Tensor, Tensor]]
LOSS_TERMS: dict[str, type["LossTerm"]] = {}


def register_loss_term(name: str):
    """Class decorator: register a :class:`LossTerm` subclass under ``name``."""

    def deco(cls: type["LossTerm"]) -> type["LossTerm"]:
        if name in LOSS_TERMS and LOSS_TERMS[name] is not cls:
            raise KeyError(f"loss term {name!r} is already registered by {LOSS_TERMS[name]}")
        cls.name = name
        LOSS_TERMS[name] = cls
        return cls

    return deco


def build_loss_term(name: str, num_classes: int, **kwargs: Any) -> "LossTerm":
    """Instantiate the loss term registered as ``name``."""
    if name not in LOSS_TERMS:
        raise KeyError(f"unknown loss term {name!r}; registered: {sorted(LOSS_TERMS)}")
    return LOSS_TERMS[name](num_classes=num_classes, **kwargs)


class LossTerm:
    """Base class of registered loss terms (see the module docstring for the call signature)."""

    name: str = "loss"
    keys: tuple[str, ...] = ()
    required_keys: tuple[str, ...] = ()

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Any]],
        indices: Indices,
        num_targets: float,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def check_outputs(self, outputs: Mapping[str, Any]) -> None:
        missing = [k for k in self.required_keys if k not in outputs]
        if missing:
            raise KeyError(f"loss term {self.name!r} needs output key(s) {missing}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "matcher")
        return f"{type(self).__name__}({args})"


def src_permutation_idx(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch_idx [M], query_idx [M]) of all matched predictions, on ``device`` (DETR)."""
    batch = [torch.full_like(src, i) for i, (src, _) in enumerate(indices)]
    if not batch:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    return torch.cat(batch).to(device), torch.cat([src for src, _ in indices]).to(device)


def matched_labels(
    targets: Sequence[Mapping[str, Any]], indices: Indices, device: torch.device
) -> Tensor:
    """Labels of the matched targets: [M] int64 on ``device``, order of src_permutation_idx."""
    labels = [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]
    if not labels:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(labels).to(device=device, dtype=torch.int64)


def matched_target_masks(
    targets: Sequence[Mapping[str, Any]], indices: Indices, size: tuple[int, int]
) -> Tensor:
    """Matched GT masks, bilinearly resized to ``size`` (soft, as K-Net's targets).

    Returns:
        [M, h, w] float32, in the order of :func:`src_permutation_idx`.
    """
    out = []
    for t, (_, tgt_idx) in zip(targets, indices):
        masks = t["masks"]
        tgt_idx = tgt_idx.to(masks.device)
        if 2 * tgt_idx.numel() >= masks.shape[0]:  # resize first: no full-resolution copy
            out.append(resize_masks(masks, size)[tgt_idx])
        else:
            out.append(resize_masks(masks[tgt_idx], size))
    if not out:
        return torch.zeros((0, *size))
    return torch.cat(out)


@register_loss_term("labels_focal")
class FocalLabelsLoss(LossTerm):
    """``loss_cls``: sigmoid focal on ``pred_logits`` [B, Q, C] against one-hot matched labels
    (unmatched = all-zero rows), sum / ``num_targets`` (K-Net, QueryInst; alpha .25, gamma 2)."""

    keys = ("loss_cls",)
    required_keys = ("pred_logits",)

    def __init__(self, num_classes: int, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__(num_classes)
        self.alpha, self.gamma = alpha, gamma

    def __call__(self, outputs, targets, indices, num_targets):
        logits = outputs["pred_logits"]
        onehot = torch.zeros_like(logits)
        b_idx, q_idx = src_permutation_idx(indices, logits.device)
        labels = matched_labels(targets, indices, logits.device)
        onehot[b_idx, q_idx, labels] = 1.0
        loss = sigmoid_focal_loss(
            logits, onehot, alpha=self.alpha, gamma=self.gamma, avg_factor=num_targets
        )
        return {"loss_cls": loss}


@register_loss_term("labels_ce")
class SoftmaxLabelsLoss(LossTerm):
    """``loss_ce``: softmax CE over C+1 classes (``pred_logits`` [B, Q, C+1]), unmatched queries
    get the no-object class C, weighted mean with ``empty_weight`` (no-object weight 0.1;
    DETR/Mask2Former/FastInst)."""

    keys = ("loss_ce",)
    required_keys = ("pred_logits",)

    def __init__(self, num_classes: int, no_object_weight: float = 0.1):
        super().__init__(num_classes)
        self.no_object_weight = no_object_weight

    def __call__(self, outputs, targets, indices, num_targets):
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"labels_ce expects {self.num_classes + 1} logits (C + no-object), "
                f"got {logits.shape[-1]}"
            )
        weight = logits.new_ones(self.num_classes + 1)
        weight[-1] = self.no_object_weight
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64)
        classes = classes.to(logits.device)
        b_idx, q_idx = src_permutation_idx(indices, logits.device)
        labels = matched_labels(targets, indices, logits.device)
        classes[b_idx, q_idx] = labels
        return {"loss_ce": softmax_ce_loss(loss_precision(logits), classes, class_weight=weight)}


@register_loss_term("masks_point")
class PointMaskLoss(LossTerm):
    """``loss_mask`` + ``loss_dice`` on PointRend importance-sampled points (Mask2Former/FastInst:
    12544 points, oversample 3, importance 0.75, dice +1), sums / ``num_targets``."""

    keys = ("loss_mask", "loss_dice")
    required_keys = ("pred_masks",)

    def __init__(
        self,
        num_classes: int,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__(num_classes)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def __call__(self, outputs, targets, indices, num_targets):
        masks = outputs["pred_masks"]
        b_idx, q_idx = src_permutation_idx(indices, masks.device)
        src = loss_precision(masks[b_idx, q_idx])[:, None]  # [M, 1, h, w]
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src.detach(),
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            labels = sample_matched_target_masks(targets, indices, coords)
        point_logits = point_sample(src, coords)[:, 0]
        return {
            "loss_mask": bce_with_logits_loss(point_logits, labels, avg_factor=num_targets),
            "loss_dice": dice_loss(
                point_logits, labels, form="plain", eps=1.0, avg_factor=num_targets
            ),
        }


def sample_matched_target_masks(
    targets: Sequence[Mapping[str, Any]], indices: Indices, coords: Tensor
) -> Tensor:
    """Bilinearly sample each matched GT mask at its own points, without copying the masks.

    Coordinates are normalised to the batch frame (the largest mask size in the batch, masks
    zero-padded bottom/right, as Mask2Former's nested tensor); a smaller image's coordinates
    are rescaled, which gives the same values as padding it. When an image's targets are all
    matched, the masks are sampled in place (a view) with the points permuted instead.

    Args:
        targets: B dicts with ``masks`` [G_b, H_b, W_b].
        indices: B matchings (query_idx, target_idx).
        coords: [M, P, 2] normalised (x, y), rows in :func:`src_permutation_idx` order.

    Returns:
        [M, P] float32 sampled targets on ``coords.device``.
    """
    height = max(int(t["masks"].shape[-2]) for t in targets)
    width = max(int(t["masks"].shape[-1]) for t in targets)
    out, start = [], 0
    for t, (_, tgt_idx) in zip(targets, indices):
        num = int(tgt_idx.numel())
        if num == 0:
            continue
        masks = t["masks"].to(coords.device, torch.float32)  # no copy if already fp32
        scale = coords.new_tensor([width / masks.shape[-1], height / masks.shape[-2]])
        pts = coords[start : start + num] * scale
        tgt_idx = tgt_idx.to(coords.device)
        if num == masks.shape[0]:  # a permutation: sample in place, permute the points
            order = torch.argsort(tgt_idx)
            sampled = point_sample(masks[:, None], pts[order])[:, 0][tgt_idx]
        else:
            sampled = point_sample(masks[tgt_idx][:, None], pts)[:, 0]
        out.append(sampled)
        start += num
    if not out:
        return coords.new_zeros(coords.shape[:2])
    return torch.cat(out)


class _DenseMaskBase(LossTerm):
    required_keys = ("pred_masks",)

    def __init__(self, num_classes: int, normalizer: str = "local"):
        super().__init__(num_classes)
        if normalizer not in ("local", "global"):
            raise ValueError(f"normalizer must be 'local' or 'global', got {normalizer!r}")
        self.normalizer = normalizer

    def _pairs(self, outputs, targets, indices, num_targets):
        masks = outputs["pred_masks"]
        b_idx, q_idx = src_permutation_idx(indices, masks.device)
        src = loss_precision(masks[b_idx, q_idx])
        tgt = matched_target_masks(targets, indices, tuple(masks.shape[-2:])).to(src.device)
        avg = None if self.normalizer == "local" else num_targets
        return src, tgt, avg


@register_loss_term("mask_bce")
class DenseMaskBCELoss(_DenseMaskBase):
    """``loss_mask``: dense BCE at the prediction resolution (targets bilinearly resized, soft).
    ``normalizer="local"``: mean over this worker's matched masks (K-Net); ``"global"``:
    sum / ``num_targets``."""

    keys = ("loss_mask",)

    def __call__(self, outputs, targets, indices, num_targets):
        src, tgt, avg = self._pairs(outputs, targets, indices, num_targets)
        return {"loss_mask": bce_with_logits_loss(src, tgt, avg_factor=avg)}


@register_loss_term("mask_dice")
class DenseMaskDiceLoss(_DenseMaskBase):
    """``loss_dice``: dense dice on logits at the prediction resolution. Defaults are K-Net's
    (squared denominator, eps 1e-3, local mean over matched masks)."""

    keys = ("loss_dice",)

    def __init__(
        self, num_classes: int, form: str = "squared", eps: float = 1e-3, normalizer: str = "local"
    ):
        super().__init__(num_classes, normalizer)
        self.form, self.eps = form, eps

    def __call__(self, outputs, targets, indices, num_targets):
        src, tgt, avg = self._pairs(outputs, targets, indices, num_targets)
        loss = dice_loss(src, tgt, form=self.form, eps=self.eps, avg_factor=avg)
        return {"loss_dice": loss}


@register_loss_term("boxes")
class BoxLoss(LossTerm):
    """``loss_bbox`` (L1 on xyxy normalised by the unpadded image whwh, summed over coords) and
    ``loss_giou`` (1 - GIoU on absolute xyxy), each sum / ``num_targets`` (QueryInst)."""

    keys = ("loss_bbox", "loss_giou")
    required_keys = ("pred_boxes",)

    def __call__(self, outputs, targets, indices, num_targets):
        boxes = outputs["pred_boxes"]
        b_idx, q_idx = src_permutation_idx(indices, boxes.device)
        src = loss_precision(boxes[b_idx, q_idx])
        tgt, src_n, tgt_n = [], [], []
        start = 0
        for t, (_, j) in zip(targets, indices):
            gt = t["boxes"][j.to(t["boxes"].device)].to(src)
            n = gt.shape[0]
            tgt.append(gt)
            src_n.append(normalize_boxes(src[start : start + n], t["image_size"]))
            tgt_n.append(normalize_boxes(gt, t["image_size"]))
            start += n
        if start == 0:
            zero = boxes.sum() * 0.0
            return {"loss_bbox": zero, "loss_giou": zero.clone()}
        loss_bbox = l1_box_loss(torch.cat(src_n), torch.cat(tgt_n), avg_factor=num_targets)
        loss_giou = giou_loss(src, torch.cat(tgt), avg_factor=num_targets)
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}
