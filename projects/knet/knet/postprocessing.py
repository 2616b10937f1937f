"""K-Net inference: NMS-free top-k instances and the panoptic thing/stuff merge, in Detectron2's
output formats.

Provenance: ``KernelIterHead.simple_test`` / ``get_panoptic`` / ``merge_stuff_thing`` and
``KernelUpdateHead.rescale_masks`` (ZwwWayne/K-Net @5e50ee5). Differences: boxes are derived
from the masks (the official boxes are zeros) so box AP and the Visualizer work; the panoptic
map uses Detectron2's (segment id map, segments_info) instead of ``label + id * 1000``.
"""

from __future__ import annotations

import torch
from detectron2.structures import BitMasks, Boxes, Instances
from torch import Tensor
from torch.nn import functional as F


def rescale_mask_probs(
    mask_logits: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> Tensor:
    """Sigmoid -> bilinear to the padded input -> crop the image -> bilinear to the output.

    Args:
        mask_logits: [Q, h, w] mask logits (stride 4 of the padded input).
        padded_size: (H_pad, W_pad) of the batched input tensor.
        image_size: (h_img, w_img) of this image inside the padded tensor.
        output_size: (height, width) requested for the output.

    Returns:
        [Q, height, width] mask probabilities.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, *output_size))
    probs = F.interpolate(
        mask_logits[None].sigmoid(), size=padded_size, mode="bilinear", align_corners=False
    )
    probs = probs[:, :, : image_size[0], : image_size[1]]
    if tuple(probs.shape[-2:]) != tuple(output_size):
        probs = F.interpolate(probs, size=output_size, mode="bilinear", align_corners=False)
    return probs[0]


def instance_inference(
    cls_logits: Tensor,
    mask_logits: Tensor,
    *,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    max_per_image: int = 100,
    mask_thr: float = 0.5,
) -> Instances:
    """Top-k over all (kernel, class) sigmoid scores; no NMS and no score threshold.

    Args:
        cls_logits: [Q, C] last-stage class logits.
        mask_logits: [Q, h, w] last-stage mask logits at stride 4.
        padded_size, image_size, output_size: see :func:`rescale_mask_probs`.

    Returns:
        Instances of ``output_size`` with ``pred_masks`` [k, H, W] bool, ``scores`` [k],
        ``pred_classes`` [k] and ``pred_boxes`` (tight boxes of the masks), k = min(max, Q*C).
    """
    num_classes = cls_logits.shape[1]
    scores = cls_logits.sigmoid().flatten()
    k = min(max_per_image, scores.numel())
    scores, idx = scores.topk(k, sorted=True)
    kernel_idx = torch.div(idx, num_classes, rounding_mode="floor")
    labels = idx % num_classes
    masks = rescale_mask_probs(mask_logits[kernel_idx], padded_size, image_size, output_size)
    masks = masks > mask_thr
    result = Instances(output_size)
    result.pred_masks = masks
    result.pred_boxes = (
        BitMasks(masks).get_bounding_boxes() if k else Boxes(masks.new_zeros((0, 4)).float())
    )
    result.scores = scores
    result.pred_classes = labels
    return result


def panoptic_inference(
    cls_logits: Tensor,
    mask_logits: Tensor,
    *,
    num_proposals: int,
    num_thing_classes: int,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    instance_score_thr: float = 0.3,
    overlap_thr: float = 0.6,
    mask_thr: float = 0.5,
) -> tuple[Tensor, list[dict]]:
    """K-Net's panoptic merge.

    Thing kernel i < N scores ``max`` over the thing columns; stuff kernel N + j scores its own
    column T + j. Every pixel goes to ``argmax_i score_i * prob_i``. Kernels are visited by
    descending score: things below ``instance_score_thr`` are skipped; a kernel keeps its pixels
    when they are non-empty and cover at least ``overlap_thr`` of its own mask
    (``prob >= mask_thr``). Pixels of skipped kernels stay void (0).

    Args:
        cls_logits: [N + S, C] last-stage class logits (C = T + S).
        mask_logits: [N + S, h, w] last-stage mask logits at stride 4.

    Returns:
        (panoptic_seg [H, W] int32 with segment ids 1.. and 0 = void, segments_info list of
        {"id", "category_id" (contiguous, things first), "isthing", "score"}).
    """
    n, t = num_proposals, num_thing_classes
    probs = cls_logits.sigmoid()
    thing_scores, thing_labels = probs[:n, :t].max(dim=1)
    stuff_scores = probs[n:, t:].diagonal()
    stuff_labels = torch.arange(probs.shape[0] - n, device=probs.device) + t
    scores = torch.cat([thing_scores, stuff_scores])
    labels = torch.cat([thing_labels, stuff_labels])
    masks = rescale_mask_probs(mask_logits, padded_size, image_size, output_size)
    winner = (scores[:, None, None] * masks).argmax(dim=0)
    won_area = torch.bincount(winner.flatten(), minlength=masks.shape[0]).tolist()
    own_area = (masks >= mask_thr).flatten(1).sum(1).tolist()
    panoptic_seg = torch.zeros(output_size, dtype=torch.int32, device=masks.device)
    segments_info: list[dict] = []
    order = torch.argsort(scores, descending=True).tolist()
    score_list, label_list = scores.tolist(), labels.tolist()
    for k in order:
        isthing = label_list[k] < t
        if isthing and score_list[k] < instance_score_thr:
            continue
        if won_area[k] == 0 or own_area[k] == 0 or won_area[k] / own_area[k] < overlap_thr:
            continue
        segment_id = len(segments_info) + 1
        panoptic_seg[winner == k] = segment_id
        segments_info.append(
            {
                "id": segment_id,
                "category_id": int(label_list[k]),
                "isthing": bool(isthing),
                "score": float(score_list[k]),
            }
        )
    return panoptic_seg, segments_info
