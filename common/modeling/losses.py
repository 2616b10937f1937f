"""Pure loss functions shared by K-Net, QueryInst, FastInst and EmbedMask.

Every function takes per-element (or per-mask / per-box) inputs and an explicit reduction:

- ``reduction="none"``: the per-item losses (shape stated per function);
- ``reduction="sum"``: their sum (``avg_factor`` must be None);
- ``reduction="mean"``: ``sum / avg_factor`` when ``avg_factor`` is given (mmdet's convention,
  used for "divide by the all-reduced number of masks/positives"), else the plain mean over items.

Empty inputs give a zero loss that keeps a ``grad_fn`` when the input requires grad (``x.sum()``
of an empty tensor), never NaN. Provenance is noted per function; the formulas follow the design
specs in ``shared/specs`` (K-Net A4, QueryInst B4, FastInst A.8, EmbedMask B.5).
"""

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor
from torch.nn import functional as F

from common.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = [
    "reduce_loss",
    "sigmoid_focal_loss",
    "softmax_ce_loss",
    "bce_with_logits_loss",
    "dice_loss",
    "point_sampled_mask_losses",
    "l1_box_loss",
    "giou_loss",
    "box_area",
    "generalized_box_iou",
    "pairwise_generalized_box_iou",
    "normalize_boxes",
    "lovasz_grad",
    "lovasz_hinge",
]

AvgFactor = float | int | Tensor | None
_REDUCTIONS = ("none", "sum", "mean")


def reduce_loss(loss: Tensor, reduction: str = "mean", avg_factor: AvgFactor = None) -> Tensor:
    """Reduce item-wise losses.

    Args:
        loss: [...] per-item losses.
        reduction: "none" | "sum" | "mean" (see the module docstring).
        avg_factor: divisor for ``reduction="mean"`` (a number > 0 or a 0-d tensor, which is
            clamped to >= float32 eps). None means the number of items.

    Returns:
        ``loss`` unchanged for "none", else a 0-d tensor. An empty "mean" is 0, not NaN.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if reduction == "none":
        if avg_factor is not None:
            raise ValueError("avg_factor has no meaning with reduction='none'")
        return loss
    if reduction == "sum":
        if avg_factor is not None:
            raise ValueError("avg_factor can only be used with reduction='mean'")
        return loss.sum()
    if avg_factor is None:
        return loss.sum() / max(loss.numel(), 1)
    if isinstance(avg_factor, Tensor):
        eps = torch.finfo(torch.float32).eps
        return loss.sum() / avg_factor.to(loss.dtype).clamp(min=eps)
    if avg_factor <= 0:
        raise ValueError(f"avg_factor must be > 0, got {avg_factor}")
    return loss.sum() / avg_factor


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """Sigmoid focal loss (RetinaNet; same values as torchvision and mmdet's py version).

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` per element, with ``alpha_t = alpha`` on positives
    and ``1 - alpha`` on negatives (no alpha weighting if ``alpha < 0``).

    Args:
        logits: [N, C] (or any shape) class logits.
        targets: same shape, one-hot (or soft) float targets; background rows are all zeros.
        alpha, gamma: focal parameters (K-Net/QueryInst/FCOS: 0.25, 2).
        weight: optional element weights broadcastable to ``logits`` (e.g. K-Net's [N, C]
            panoptic label weights).
        reduction, avg_factor: see :func:`reduce_loss`. K-Net/QueryInst: "mean" with
            ``avg_factor`` = all-reduced number of positives clamped to >= 1.

    Returns:
        Same shape as ``logits`` for "none", else a 0-d tensor.
    """
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if weight is not None:
        loss = loss * weight
    return reduce_loss(loss, reduction, avg_factor)


def softmax_ce_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """Softmax cross-entropy with optional per-class weights (DETR/Mask2Former ``empty_weight``).

    ``reduction="mean"`` without ``avg_factor`` is ``F.cross_entropy``'s weighted mean:
    ``sum_i w[y_i] ce_i / sum_i w[y_i]`` over non-ignored items (Mask2Former/FastInst ``loss_ce``
    with ``empty_weight[-1] = 0.1``; FastInst ``loss_proposal`` with ``ignore_index=-1``).
    With ``avg_factor`` it is ``sum_i w[y_i] ce_i / avg_factor``.

    Args:
        logits: [..., K] class logits (K = C + 1 for a no-object column).
        labels: [...] long targets in [0, K) or ``ignore_index``.
        class_weight: optional [K] weights.

    Returns:
        [...] for "none" (0 at ignored items), else a 0-d tensor; 0 if nothing is valid.
    """
    num_classes = logits.shape[-1]
    flat_logits = logits.reshape(-1, num_classes)
    flat_labels = labels.reshape(-1).long()
    ce = F.cross_entropy(flat_logits, flat_labels, reduction="none", ignore_index=ignore_index)
    valid = flat_labels != ignore_index
    if class_weight is None:
        weights = valid.to(ce.dtype)
    else:
        safe = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
        weights = class_weight.to(ce.dtype)[safe] * valid
    loss = ce * weights
    if reduction == "none":
        return reduce_loss(loss.reshape(labels.shape), "none")
    if reduction == "mean" and avg_factor is None:
        # weights are >= 0; an all-ignored/empty input gives 0 / eps = 0 (no host sync)
        return loss.sum() / weights.sum().clamp(min=torch.finfo(loss.dtype).eps)
    return reduce_loss(loss, reduction, avg_factor)


def bce_with_logits_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """Per-mask binary cross-entropy on logits: mean over pixels/points, then reduced over masks.

    Mask2Former/FastInst ``loss_mask``: ``reduction="mean", avg_factor=num_masks``
    (``sum_n mean_p BCE / num_masks``). K-Net ``loss_mask`` (mmdet sigmoid CrossEntropyLoss,
    mean over all pixels of the positive masks): ``reduction="mean"`` with no ``avg_factor``.

    Args:
        logits: [N, ...] mask logits (pixels or sampled points; N masks).
        targets: [N, ...] same shape, in [0, 1] (soft targets allowed).

    Returns:
        [N] for "none", else a 0-d tensor.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} vs {tuple(targets.shape)}")
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    loss = loss.flatten(1)
    loss = loss.mean(1) if loss.shape[1] > 0 else loss.sum(1)
    return reduce_loss(loss, reduction, avg_factor)


def dice_loss(
    inputs: Tensor,
    targets: Tensor,
    *,
    form: str = "plain",
    eps: float = 1.0,
    from_logits: bool = True,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """Dice loss per mask, in the two forms the four methods use.

    - ``form="plain"`` (Mask2Former/FastInst, V-Net with +1 smoothing; use ``eps=1.0``):
      ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``.
    - ``form="squared"`` (mmdet DiceLoss ``naive_dice=False``; K-Net ``eps=1e-3`` logits in,
      mean over masks; QueryInst ``eps=1e-5`` probabilities in, ``avg_factor=#pos``):
      ``1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps)``.

    Args:
        inputs: [N, ...] mask logits (``from_logits=True``; sigmoid applied here) or
            probabilities (``from_logits=False``; used as is, so apply the sigmoid only once).
        targets: [N, ...] same shape, in [0, 1].
        form: "plain" | "squared".
        eps: smoothing / stabiliser as in the formulas above.

    Returns:
        [N] for "none", else a 0-d tensor.
    """
    if inputs.shape != targets.shape:
        raise ValueError(f"shape mismatch: inputs {tuple(inputs.shape)} vs {tuple(targets.shape)}")
    probs = inputs.sigmoid() if from_logits else inputs
    probs = probs.flatten(1)
    tgt = targets.flatten(1).to(probs.dtype)
    inter = (probs * tgt).sum(1)
    if form == "plain":
        loss = 1 - (2 * inter + eps) / (probs.sum(1) + tgt.sum(1) + eps)
    elif form == "squared":
        loss = 1 - 2 * inter / ((probs * probs).sum(1) + eps + (tgt * tgt).sum(1) + eps)
    else:
        raise ValueError(f"form must be 'plain' or 'squared', got {form!r}")
    return reduce_loss(loss, reduction, avg_factor)


def point_sampled_mask_losses(
    mask_logits: Tensor,
    target_masks: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    avg_factor: AvgFactor = None,
    dice_eps: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask2Former/FastInst mask losses on PointRend importance-sampled points.

    Per mask, ``num_points`` points are chosen on the detached logits by
    :func:`~common.modeling.point_sampling.get_uncertain_point_coords_with_randomness`
    (``-|logit|`` uncertainty); prediction and target are bilinearly sampled there
    (``align_corners=False``; the target may have any resolution). Returns the BCE
    (mean over points) and the plain dice (+``dice_eps`` smoothing), each summed over masks and
    divided by ``avg_factor`` (Mask2Former: all-reduced ``num_masks``; None: number of masks).

    Args:
        mask_logits: [N, h, w] matched mask logits.
        target_masks: [N, H, W] matched GT masks in [0, 1] (any H, W; e.g. the padded input).

    Returns:
        (loss_bce, loss_dice): two 0-d tensors; zeros carrying ``mask_logits``'s graph if N = 0.
    """
    if mask_logits.shape[0] != target_masks.shape[0]:
        raise ValueError(
            f"{mask_logits.shape[0]} predicted masks vs {target_masks.shape[0]} target masks"
        )
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0
        return zero, zero.clone()
    src = mask_logits[:, None]
    tgt = target_masks[:, None].to(mask_logits.dtype)
    with torch.no_grad():
        coords = get_uncertain_point_coords_with_randomness(
            src.detach(),
            calculate_uncertainty,
            num_points,
            oversample_ratio,
            importance_sample_ratio,
            generator=generator,
        )
        point_labels = point_sample(tgt, coords)[:, 0]
    point_logits = point_sample(src, coords)[:, 0]
    loss_bce = bce_with_logits_loss(point_logits, point_labels, avg_factor=avg_factor)
    loss_dice = dice_loss(
        point_logits, point_labels, form="plain", eps=dice_eps, avg_factor=avg_factor
    )
    return loss_bce, loss_dice


def l1_box_loss(
    pred: Tensor,
    target: Tensor,
    *,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """L1 box loss summed over the 4 coordinates of each box (QueryInst: normalised xyxy boxes,
    ``reduction="mean", avg_factor=#pos``; note mmdet's L1Loss with avg_factor also sums coords).

    Args:
        pred, target: [N, 4] boxes in the same (e.g. normalised) frame.

    Returns:
        [N] for "none", else a 0-d tensor.
    """
    loss = (pred - target.to(pred.dtype)).abs().sum(-1)
    return reduce_loss(loss, reduction, avg_factor)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of [..., 4] xyxy boxes (negative extents count as 0). Returns [...]."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(
        min=0
    )


def _giou_from_corners(
    boxes1: Tensor, boxes2: Tensor, area1: Tensor, area2: Tensor, eps: float
) -> Tensor:
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = box_area(torch.cat([lt, rb], dim=-1))
    union = (area1 + area2 - inter).clamp(min=eps)
    iou = inter / union
    enc_lt = torch.min(boxes1[..., :2], boxes2[..., :2])
    enc_rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    enclose = box_area(torch.cat([enc_lt, enc_rb], dim=-1)).clamp(min=eps)
    return iou - (enclose - union) / enclose


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Element-wise GIoU of aligned xyxy boxes (mmdet ``bbox_overlaps(..., 'giou', is_aligned)``:
    union and enclosing area clamped to >= ``eps``).

    Args:
        boxes1, boxes2: [N, 4] xyxy.

    Returns:
        [N] GIoU in [-1, 1].
    """
    return _giou_from_corners(boxes1, boxes2, box_area(boxes1), box_area(boxes2), eps)


def pairwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Pairwise GIoU of xyxy boxes.

    Args:
        boxes1: [N, 4] xyxy; boxes2: [M, 4] xyxy.

    Returns:
        [N, M] GIoU.
    """
    b1, b2 = boxes1[:, None, :], boxes2[None, :, :]
    return _giou_from_corners(b1, b2, box_area(b1), box_area(b2), eps)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    *,
    eps: float = 1e-6,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """GIoU loss ``1 - GIoU`` on aligned absolute xyxy boxes (QueryInst ``loss_iou``, mmdet
    GIoULoss eps 1e-6; ``reduction="mean", avg_factor=#pos``).

    Args:
        pred, target: [N, 4] xyxy.

    Returns:
        [N] for "none", else a 0-d tensor.
    """
    loss = 1 - generalized_box_iou(pred, target.to(pred.dtype), eps=eps)
    return reduce_loss(loss, reduction, avg_factor)


def loss_precision(x: Tensor) -> Tensor:
    """``x`` in the precision losses are computed in: float32 for half/bfloat16/float32 inputs
    (mixed precision), float64 kept as float64 (the parity suite compares float64 runs)."""
    return x if x.dtype == torch.float64 else x.float()


def normalize_boxes(boxes: Tensor, image_size: Union[Tensor, Sequence[int]]) -> Tensor:
    """Divide absolute xyxy boxes by the image's (w, h, w, h).

    Args:
        boxes: [N, 4] absolute xyxy.
        image_size: (h, w) of the unpadded image (tensor or sequence).

    Returns:
        [N, 4] normalised xyxy.
    """
    size = torch.as_tensor(image_size, dtype=boxes.dtype, device=boxes.device).reshape(-1)
    if size.numel() != 2:
        raise ValueError(f"image_size must be (h, w), got {tuple(size.shape)}")
    h, w = size[0], size[1]
    return boxes / torch.stack([w, h, w, h])


def lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman 2018).

    Args:
        gt_sorted: [N, P] binary labels sorted by decreasing error, per row.

    Returns:
        [N, P] (the float dtype of ``gt_sorted``, else float32): ``J(1..i) - J(1..i-1)``
        with J the Jaccard loss of the first i errors.
    """
    gt = gt_sorted if gt_sorted.is_floating_point() else gt_sorted.float()
    gts = gt.sum(1, keepdim=True)
    intersection = gts - gt.cumsum(1)
    union = gts + (1 - gt).cumsum(1)
    jaccard = 1.0 - intersection / union
    if gt.shape[1] > 1:
        jaccard = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return jaccard


def lovasz_hinge(
    logits: Tensor,
    labels: Tensor,
    *,
    per_instance: bool = True,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """Binary Lovász hinge loss (Berman et al., CVPR 2018), as EmbedMask applies it to logit(p).

    For one instance with logits ``x`` and signs ``s = 2y - 1``: errors ``e = 1 - x s``, sorted
    decreasingly; loss ``= sum_i relu(e_(i)) * (J(1..i) - J(1..i-1))`` with ``J`` the Jaccard
    loss of predicting the first i pixels wrong (:func:`lovasz_grad`).

    Args:
        logits: [N, ...] per-instance logits (pixels of the instance's map).
        labels: [N, ...] same shape, binary {0, 1}.
        per_instance: True: one loss per instance (EmbedMask, then averaged). False: all pixels
            of all instances form one set (returns a single-item loss).

    Returns:
        [N] (or [1] if not ``per_instance``) for "none", else a 0-d tensor.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} vs {tuple(labels.shape)}")
    flat = logits.flatten(1) if per_instance else logits.reshape(1, -1)
    lab = labels.reshape(flat.shape).to(flat.dtype)
    if flat.shape[1] == 0:
        return reduce_loss(flat.sum(1) * 0.0, reduction, avg_factor)
    signs = 2.0 * lab - 1.0
    errors = 1.0 - flat * signs
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    grad = lovasz_grad(torch.gather(lab, 1, perm))
    loss = (F.relu(errors_sorted) * grad.to(flat.dtype)).sum(1)
    return reduce_loss(loss, reduction, avg_factor)
