"""The one augmentation list every QuerySeg training mapper uses.

Order (training): [optional DETR-style crop chain] → multi-scale ResizeShortestEdge → [crop] →
flip → [photometric distortion]; or, with ``INPUT.LSJ.ENABLED``, large-scale jitter
(ResizeScale + FixedSizeCrop) → flip. Testing: ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST).
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.data import transforms as T


def _crop_aug(cfg: CfgNode) -> T.Augmentation:
    if cfg.INPUT.CROP.TYPE == "absolute_range" and list(cfg.INPUT.CROP.SIZE)[0] > 0:
        return T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE)
    if cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA < 1.0:
        return T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE,
            cfg.INPUT.CROP.SIZE,
            cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )
    return T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE)


def build_augmentation(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """Return the augmentation list for training or testing, read from ``cfg.INPUT``."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    flip = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        flip = [
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        ]
    if cfg.INPUT.LSJ.ENABLED:
        size = cfg.INPUT.LSJ.IMAGE_SIZE
        return [
            T.ResizeScale(cfg.INPUT.LSJ.MIN_SCALE, cfg.INPUT.LSJ.MAX_SCALE, size, size),
            T.FixedSizeCrop(
                crop_size=(size, size), seg_pad_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
            ),
            *flip,
        ]
    augs: list[T.Augmentation] = []
    if cfg.INPUT.DETR_CROP.PROB > 0:
        chain = T.AugmentationList(
            [
                T.ResizeShortestEdge(cfg.INPUT.DETR_CROP.SHORT_EDGES, sample_style="choice"),
                _crop_aug(cfg),
            ]
        )
        augs.append(T.RandomApply(chain, prob=cfg.INPUT.DETR_CROP.PROB))
    augs.append(
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.DETR_CROP.PROB == 0:
        augs.append(_crop_aug(cfg))
    augs.extend(flip)
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.extend(
            [
                T.RandomBrightness(0.875, 1.125),
                T.RandomContrast(0.5, 1.5),
                T.RandomSaturation(0.5, 1.5),
            ]
        )
    return augs
