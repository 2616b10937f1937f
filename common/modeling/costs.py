"""Pluggable matching cost terms for :class:`common.modeling.matcher.HungarianMatcher`.

A cost term maps one image's detached fp32 predictions and its targets to a [Q, G] cost matrix
(lower = better match). Terms are registered by name in :data:`COST_TERMS` so configs can name
them; :func:`build_cost_term` instantiates one. Method-specific terms can be added with
``@register_cost_term("name")``.

Per-image prediction dict (from the matcher; Q rows):
    ``pred_logits`` [Q, K], ``pred_masks`` [Q, h, w] logits, ``pred_boxes`` [Q, 4] absolute xyxy,
    ``pred_locations`` [Q, 2] normalised (x, y), ``proposal_size`` (H, W) for dense proposal rows.
Per-image target dict: ``labels`` [G] long, ``masks`` [G, H, W], ``boxes`` [G, 4] absolute xyxy,
``image_size`` (h, w) of the unpadded image.

Terms sharing work (resized targets, shared random points) use the per-image ``cache`` dict that
the matcher passes to every term of one image.
"""

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from common.modeling.losses import normalize_boxes, pairwise_generalized_box_iou
from common.modeling.point_sampling import sample_channels_at_points, uniform_point_coords

__all__ = [
    "COST_TERMS",
    "CostTerm",
    "register_cost_term",
    "build_cost_term",
    "FocalClassCost",
    "SoftmaxClassCost",
    "MaskAgreementCost",
    "MaskBCECost",
    "SquaredDiceCost",
    "DiceCost",
    "PointBCECost",
    "PointDiceCost",
    "BoxL1Cost",
    "GIoUCost",
    "resize_masks",
]

COST_TERMS: dict[str, type["CostTerm"]] = {}


def register_cost_term(name: str):
    """Class decorator: register a :class:`CostTerm` subclass under ``name``."""

    def deco(cls: type["CostTerm"]) -> type["CostTerm"]:
        if name in COST_TERMS and COST_TERMS[name] is not cls:
            raise KeyError(f"cost term {name!r} is already registered by {COST_TERMS[name]}")
        cls.name = name
        COST_TERMS[name] = cls
        return cls

    return deco


def build_cost_term(name: str, **kwargs: Any) -> "CostTerm":
    """Instantiate the cost term registered as ``name`` with ``kwargs``."""
    if name not in COST_TERMS:
        raise KeyError(f"unknown cost term {name!r}; registered: {sorted(COST_TERMS)}")
    return COST_TERMS[name](**kwargs)


class CostTerm:
    """Base class: ``term(pred, target, cache) -> [Q, G]`` cost (unweighted)."""

    name: str = "cost"
    #: prediction keys the term reads (checked by the matcher, with a clear error)
    required_keys: tuple[str, ...] = ()

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize masks (``align_corners=False``, no antialiasing: mmcv/cv2 INTER_LINEAR).

    Args:
        masks: [G, H, W] (any dtype; converted to float32).
        size: target (h, w).

    Returns:
        [G, h, w] float32 (soft values; not re-binarised, as K-Net's targets).
    """
    masks = masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]


def _dense_pair(
    pred: dict[str, Any], target: dict[str, Any], cache: dict
) -> tuple[Tensor, Tensor, tuple]:
    """[Q, h*w] mask logits, [G, h*w] targets resized to the prediction size (cached), cache key."""
    logits = pred["pred_masks"]
    key = ("dense", tuple(logits.shape[-2:]))
    if key not in cache:
        cache[key] = (logits.flatten(1), resize_masks(target["masks"], key[1]).flatten(1))
    return (*cache[key], key)


def _point_pair(
    pred: dict[str, Any], target: dict[str, Any], cache: dict, num_points: int
) -> tuple[Tensor, Tensor, tuple]:
    """[Q, P] mask logits, [G, P] targets at P shared uniform random points (cached), cache key."""
    key = ("points", num_points)
    if key not in cache:
        logits = pred["pred_masks"]
        coords = uniform_point_coords(num_points, logits.device)
        cache[key] = (
            sample_channels_at_points(logits, coords),
            sample_channels_at_points(target["masks"].to(logits.device, torch.float32), coords),
        )
    return (*cache[key], key)


def _prob_dot(logits: Tensor, tgt: Tensor, cache: dict, key: tuple) -> tuple[Tensor, Tensor]:
    """``p = sigmoid(logits)`` [Q, N] and ``p @ t.T`` [Q, G], shared by the mask terms."""
    cache_key = ("prob_dot", *key)
    if cache_key not in cache:
        prob = logits.sigmoid()
        cache[cache_key] = (prob, prob @ tgt.T)
    return cache[cache_key]


def _bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE over the columns for every (prediction, target) pair: [Q, N] x [G, N] -> [Q, G].

    Uses ``BCE(x, t) = softplus(x) - x t`` (so ``BCE(x, 1) - BCE(x, 0) = -x``): one matmul
    instead of Mask2Former's two, same values.
    """
    num = max(logits.shape[1], 1)
    return (F.softplus(logits).sum(1)[:, None] - logits @ targets.T) / num


@register_cost_term("focal_class")
class FocalClassCost(CostTerm):
    """mmdet ``FocalLossCost`` (K-Net, QueryInst): focal(pos) - focal(neg) at the GT class.

    ``p = sigmoid(logit)``; cost = ``-alpha (1-p)^gamma log(p+eps) + (1-alpha) p^gamma
    log(1-p+eps)``. Needs ``pred_logits`` [Q, C] (sigmoid heads, no background column).
    """

    required_keys = ("pred_logits",)

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12):
        self.alpha, self.gamma, self.eps = alpha, gamma, eps

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        prob = pred["pred_logits"].sigmoid()[:, target["labels"]]
        neg = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
        pos = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
        return pos - neg


@register_cost_term("softmax_class")
class SoftmaxClassCost(CostTerm):
    """DETR/Mask2Former/FastInst class cost: minus the softmax probability of the GT class.
    Needs ``pred_logits`` [Q, C+1] (softmax over all columns, no-object included)."""

    required_keys = ("pred_logits",)

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        return -pred["pred_logits"].softmax(-1)[:, target["labels"]]


@register_cost_term("mask_agreement")
class MaskAgreementCost(CostTerm):
    """K-Net ``MaskCost`` (pred_act): ``-(sum p t + sum (1-p)(1-t)) / (h w)`` with p = sigmoid;
    targets bilinearly resized to the prediction size."""

    required_keys = ("pred_masks",)

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        logits, tgt, key = _dense_pair(pred, target, cache)
        prob, pt = _prob_dot(logits, tgt, cache, key)
        num = prob.shape[1]
        # sum p t + sum (1-p)(1-t) = 2 sum p t - sum p - sum t + N
        agree = 2 * pt - prob.sum(1)[:, None] - tgt.sum(1)[None, :] + num
        return -agree / max(num, 1)


@register_cost_term("mask_bce")
class MaskBCECost(CostTerm):
    """Dense sigmoid BCE averaged over all pixels (targets resized to the prediction size)."""

    required_keys = ("pred_masks",)

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        logits, tgt, _ = _dense_pair(pred, target, cache)
        return _bce_cost(logits, tgt)


@register_cost_term("dice_sq")
class SquaredDiceCost(CostTerm):
    """K-Net ``DiceCost``: ``-2 sum(p t) / (sum p^2 + eps + sum t^2 + eps)``, eps 1e-3, p = sigmoid.

    (K-Net omits the constant 1 of ``1 - dice``; the assignment is the same.)
    """

    required_keys = ("pred_masks",)

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        logits, tgt, key = _dense_pair(pred, target, cache)
        prob, pt = _prob_dot(logits, tgt, cache, key)
        den = (prob * prob).sum(1)[:, None] + self.eps + (tgt * tgt).sum(1)[None, :] + self.eps
        return -2 * pt / den


def _plain_dice_cost(logits: Tensor, tgt: Tensor, key: tuple, cache: dict, eps: float) -> Tensor:
    prob, pt = _prob_dot(logits, tgt, cache, key)
    den = prob.sum(1)[:, None] + tgt.sum(1)[None, :]
    return 1 - (2 * pt + eps) / (den + eps)


@register_cost_term("dice")
class DiceCost(CostTerm):
    """Plain dense dice (Mask2Former): ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``, eps 1."""

    required_keys = ("pred_masks",)

    def __init__(self, eps: float = 1.0):
        self.eps = eps

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        return _plain_dice_cost(*_dense_pair(pred, target, cache), cache, self.eps)


@register_cost_term("point_bce")
class PointBCECost(CostTerm):
    """Mask2Former/FastInst mask cost: sigmoid BCE averaged over ``num_points`` uniform random
    points shared by all predictions and targets of the image (GT at full resolution)."""

    required_keys = ("pred_masks",)

    def __init__(self, num_points: int = 12544):
        self.num_points = num_points

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        logits, tgt, _ = _point_pair(pred, target, cache, self.num_points)
        return _bce_cost(logits, tgt)


@register_cost_term("point_dice")
class PointDiceCost(CostTerm):
    """Mask2Former/FastInst dice cost (plain, +1 smoothing) on the shared random points."""

    required_keys = ("pred_masks",)

    def __init__(self, num_points: int = 12544, eps: float = 1.0):
        self.num_points, self.eps = num_points, eps

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        pair = _point_pair(pred, target, cache, self.num_points)
        return _plain_dice_cost(*pair, cache, self.eps)


@register_cost_term("box_l1")
class BoxL1Cost(CostTerm):
    """mmdet ``BBoxL1Cost`` (QueryInst): L1 distance of xyxy boxes normalised by the unpadded
    image's (w, h, w, h) (``target["image_size"]``)."""

    required_keys = ("pred_boxes",)

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        if "image_size" not in target:
            raise KeyError("cost 'box_l1' needs target['image_size'] = (h, w)")
        size = target["image_size"]
        out = normalize_boxes(pred["pred_boxes"], size)
        tgt = normalize_boxes(target["boxes"].to(out), size)
        return torch.cdist(out, tgt, p=1)


@register_cost_term("giou")
class GIoUCost(CostTerm):
    """mmdet ``IoUCost(iou_mode='giou')``: minus the pairwise GIoU of absolute xyxy boxes."""

    required_keys = ("pred_boxes",)

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def __call__(self, pred: dict[str, Any], target: dict[str, Any], cache: dict) -> Tensor:
        boxes = pred["pred_boxes"]
        return -pairwise_generalized_box_iou(boxes, target["boxes"].to(boxes), eps=self.eps)
