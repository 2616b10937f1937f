"""Mask2Former-style post-processing of FastInst's (class, mask) query predictions.

Provenance: as the official ``FastInst.{instance,semantic,panoptic}_inference``; differences:
instance boxes are derived from the binary masks (the official code returns all-zero boxes),
``pred_masks`` are bool (Detectron2's Mask R-CNN convention), top-k is clipped to Q x C, and
"thing" classes come from the metadata's thing list when the id map is absent.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from detectron2.structures import Boxes, Instances
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "instance_inference",
    "select_topk",
    "instances_from_probs",
    "instances_from_unique_probs",
    "semantic_inference",
    "panoptic_inference",
    "thing_class_ids",
    "masks_to_boxes",
]


def thing_class_ids(metadata) -> set[int]:
    """Contiguous ids of "thing" classes from Detectron2 metadata (things come first)."""
    id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    if id_map:
        return set(int(v) for v in id_map.values())
    return set(range(len(getattr(metadata, "thing_classes", []) or [])))


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes of binary masks, vectorised (same values as Detectron2's
    ``BitMasks.get_bounding_boxes``: exclusive max corner, zeros for empty masks).

    Args:
        masks: [N, H, W] bool.
    Returns:
        [N, 4] float32 on the masks' device.
    """
    n, h, w = masks.shape
    if n == 0 or h == 0 or w == 0:
        return torch.zeros(n, 4, device=masks.device)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)  # [N, W], [N, H]
    xs = torch.arange(w, device=masks.device).expand(n, w)
    ys = torch.arange(h, device=masks.device).expand(n, h)
    x1, x2 = torch.where(x_any, xs, w).amin(1), torch.where(x_any, xs, -1).amax(1) + 1
    y1, y2 = torch.where(y_any, ys, h).amin(1), torch.where(y_any, ys, -1).amax(1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(x_any.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def select_topk(
    mask_cls: Tensor, *, topk: int, keep_classes: Collection[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k (query, class) pairs by class probability (the first step of
    :func:`instance_inference`).

    Args:
        mask_cls: [Q, C+1] class logits (no-object last).
        topk: detections per image (clipped to Q * C).
        keep_classes: if given (panoptic models), drop detections of other classes.
    Returns:
        (scores [K], labels [K], query indices [K]).
    """
    num_classes = mask_cls.shape[1] - 1
    scores = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    k = min(topk, scores.numel())
    top_scores, top_idx = scores.flatten().topk(k, sorted=False)
    labels = top_idx % num_classes
    query_idx = top_idx // num_classes
    if keep_classes is not None:
        allowed = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
        allowed[[c for c in keep_classes if c < num_classes]] = True
        keep = allowed[labels]
        top_scores, labels, query_idx = top_scores[keep], labels[keep], query_idx[keep]
    return top_scores, labels, query_idx


def instances_from_probs(scores: Tensor, labels: Tensor, probs: Tensor) -> Instances:
    """Instances of the selected pairs: binary masks at 0.5, score x mean mask prob inside.

    Args:
        scores: [K] class probabilities; labels: [K]; probs: [K, H, W] mask probabilities.
    """
    binary = probs > 0.5
    mask_scores = (probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    result = Instances(tuple(probs.shape[-2:]))
    result.pred_masks = binary
    result.pred_boxes = Boxes(masks_to_boxes(binary))
    result.scores = scores * mask_scores
    result.pred_classes = labels
    return result


def instances_from_unique_probs(
    scores: Tensor, labels: Tensor, probs: Tensor, inverse: Tensor
) -> Instances:
    """:func:`instances_from_probs` with ``probs`` given once per distinct query: [U, H, W]
    and ``inverse`` [K] mapping each pair to its query's row. The mask score, binary mask and
    box are computed per query (they do not depend on the class) and gathered: the same
    values as :func:`instances_from_probs` on ``probs[inverse]`` (``where`` for the product
    with the bool mask and ``count_nonzero`` for its sum give the same numbers without
    materialising float/int64 copies of the masks)."""
    binary = probs > 0.5
    kept = torch.where(binary, probs, probs.new_zeros(())).flatten(1).sum(1)
    mask_scores = kept / (torch.count_nonzero(binary.flatten(1), dim=1) + 1e-6)
    result = Instances(tuple(probs.shape[-2:]))
    result.pred_masks = binary[inverse]
    result.pred_boxes = Boxes(masks_to_boxes(binary)[inverse])
    result.scores = scores * mask_scores[inverse]
    result.pred_classes = labels
    return result


def instance_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    topk: int,
    keep_classes: Collection[int] | None = None,
) -> Instances:
    """Top-k (query, class) pairs by class probability; score = class prob x mean mask prob
    inside the binary mask; no NMS.

    Args:
        mask_cls: [Q, C+1] class logits (no-object last).
        mask_pred: [Q, H, W] mask logits at the output resolution.
        topk: detections per image (clipped to Q * C).
        keep_classes: if given (panoptic models), drop detections of other classes.
    Returns:
        Instances of image size (H, W) with ``pred_masks`` [N, H, W] bool, ``pred_boxes``
        (from the masks), ``scores`` [N], ``pred_classes`` [N].
    """
    top_scores, labels, query_idx = select_topk(mask_cls, topk=topk, keep_classes=keep_classes)
    return instances_from_probs(top_scores, labels, mask_pred[query_idx].float().sigmoid())


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """Per-class score map: sum over queries of class prob x mask prob.

    Args:
        mask_cls: [Q, C+1] class logits; mask_pred: [Q, H, W] mask logits.
    Returns:
        [C, H, W].
    """
    probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.float().sigmoid())


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    object_mask_threshold: float,
    overlap_threshold: float,
    thing_ids: Collection[int],
) -> tuple[Tensor, list[dict]]:
    """Mask2Former's panoptic merge: keep confident non-background queries, assign each pixel to
    the query maximising score x mask prob, drop segments that keep less than
    ``overlap_threshold`` of their own mask, merge stuff segments of the same class.

    Args:
        mask_cls: [Q, C+1] class logits; mask_pred: [Q, H, W] mask logits.
        thing_ids: contiguous ids of thing classes.
    Returns:
        (panoptic_seg [H, W] int32 with 0 = void, segments_info list of dicts with
        ``id``, ``isthing``, ``category_id``).
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    masks = mask_pred.float().sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    h, w = masks.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    segments_info: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment_ids: dict[int, int] = {}
    segment_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        is_thing = pred_class in thing_ids
        original = cur_masks[k] >= 0.5
        mask = (mask_ids == k) & original
        mask_area, original_area = int((mask_ids == k).sum()), int(original.sum())
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not is_thing and pred_class in stuff_segment_ids:
            panoptic_seg[mask] = stuff_segment_ids[pred_class]
            continue
        segment_id += 1
        if not is_thing:
            stuff_segment_ids[pred_class] = segment_id
        panoptic_seg[mask] = segment_id
        segments_info.append({"id": segment_id, "isthing": is_thing, "category_id": pred_class})
    return panoptic_seg, segments_info
