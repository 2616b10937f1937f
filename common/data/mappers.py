"""Training dataset mappers shared by every QuerySeg method, chosen by name from one registry.

``cfg.INPUT.DATASET_MAPPER_NAME`` picks one of:

- ``"instance"``: image + ``instances`` (``gt_classes`` [G], ``gt_masks`` BitMasks [G,H,W],
  ``gt_boxes`` [G,4] recomputed from the augmented masks).
- ``"panoptic"``: image + ``instances`` holding one element per non-crowd segment (things and stuff,
  classes in the unified contiguous space, things first), a ``gt_is_thing`` [G] bool field, and
  ``sem_seg`` [H,W] long (unified classes, ``ignore_label`` for void and crowd pixels).
- ``"semantic"``: image + ``sem_seg`` [H,W] long (ignore = ``ignore_label``) + ``instances`` with
  one mask per class present (Mask2Former's semantic format).
- ``"detectron2"``: Detectron2's own :class:`DatasetMapper` (baselines, Panoptic FPN).
- ``"video_instance"``: a YouTube-VIS video dict (``common.data.ytvis``) -> a few frames of the
  clip (all of them at test time) under one augmentation, each with its ``instances`` and their
  track ids (``gt_ids``).

All of them run the same augmentation list (:func:`build_augmentation`), so methods that share a
base config read identical batches for the same seed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances
from detectron2.utils.registry import Registry

from common.data.augmentation import build_augmentation
from common.data.validation import read_image_checked, validate_annotations

MAPPER_REGISTRY = Registry("QS_DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = "Training dataset mappers, selected by cfg.INPUT.DATASET_MAPPER_NAME."


def register_mapper(name: str):
    """Decorator: register a mapper class or ``(cfg, is_train) -> mapper`` factory as ``name``."""

    def deco(obj):
        MAPPER_REGISTRY._do_register(name, obj)
        return obj

    return deco


logger = logging.getLogger(__name__)


def build_mapper(cfg: CfgNode, is_train: bool = True):
    """Build the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME`` (training) or the test mapper
    (Detectron2's, unless the named mapper declares ``serves_test``: e.g. the video mapper)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPER_REGISTRY:
        known = ", ".join(sorted(k for k, _ in MAPPER_REGISTRY))
        raise KeyError(f"INPUT.DATASET_MAPPER_NAME={name!r} is not a registered mapper ({known})")
    mapper = MAPPER_REGISTRY.get(name)
    if not is_train and not getattr(mapper, "serves_test", False):
        return TestDatasetMapper(cfg, is_train=False)
    return mapper(cfg, is_train=is_train)


def _masks_to_instances(
    masks: np.ndarray | torch.Tensor, classes: list[int], image_shape: tuple[int, int]
) -> Instances:
    """Build Instances from stacked binary masks.

    Args:
        masks: [G,H,W] bool/uint8.
        classes: G contiguous class ids.
        image_shape: (H, W).
    Returns:
        Instances with gt_classes [G], gt_masks BitMasks [G,H,W], gt_boxes [G,4] (from the masks).
    """
    inst = Instances(image_shape)
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
    h, w = image_shape
    if len(classes) == 0:
        bm = BitMasks(torch.zeros((0, h, w), dtype=torch.bool))
    else:
        bm = BitMasks(torch.as_tensor(np.ascontiguousarray(np.asarray(masks)), dtype=torch.bool))
    inst.gt_masks = bm
    inst.gt_boxes = bm.get_bounding_boxes()
    return inst


class TestDatasetMapper(DatasetMapper):
    """Detectron2's test-time DatasetMapper, with unreadable images reported by file name."""

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            return super().__call__(dataset_dict)
        except Exception:
            # re-read only on failure, to turn an unreadable image into an error naming the file
            read_image_checked(dataset_dict["file_name"], self.image_format)
            raise


class _BaseMapper:
    """Reads and augments the image; subclasses add the task's annotations."""

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str,
        ignore_label: int = 255,
        min_instance_area: int = 1,
    ):
        """
        Args:
            is_train: training mode (annotations are required and kept).
            augmentations: the augmentation list, applied to image and annotations alike.
            image_format: Detectron2 image format (e.g. "RGB", "BGR").
            ignore_label: label of ignored pixels in ``sem_seg``.
            min_instance_area: drop instances with fewer visible pixels after augmentation.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.min_instance_area = min_instance_area
        logger.info(f"[{type(self).__name__}] augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
        return {
            "is_train": is_train,
            "augmentations": build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": getattr(meta, "ignore_label", 255) if meta is not None else 255,
            "min_instance_area": cfg.INPUT.MIN_INSTANCE_AREA,
        }

    def _read(self, dataset_dict: dict, sem_seg: np.ndarray | None = None):
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image.shape[:2], transforms, aug_input.sem_seg


@register_mapper("instance")
class InstanceDatasetMapper(_BaseMapper):
    """COCO-style instance annotations → ``instances`` with bitmasks and mask-derived boxes."""

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        validate_annotations(annos, dataset_dict["file_name"], need_masks=True)
        image_shape, transforms, _ = self._read(dataset_dict)
        if not self.is_train:
            return dataset_dict
        annos = [utils.transform_instance_annotations(a, transforms, image_shape) for a in annos]
        if not annos:  # an image without things still trains (empty targets)
            empty = np.zeros((0, *image_shape), bool)
            dataset_dict["instances"] = _masks_to_instances(empty, [], image_shape)
            return dataset_dict
        inst = utils.annotations_to_instances(annos, image_shape, mask_format="bitmask")
        keep = inst.gt_masks.tensor.flatten(1).sum(1) >= self.min_instance_area
        inst = inst[keep]
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = inst
        return dataset_dict


@register_mapper("panoptic")
class PanopticDatasetMapper(_BaseMapper):
    """COCO panoptic PNG + segments_info → per-segment ``instances`` and a unified ``sem_seg``."""

    def __call__(self, dataset_dict: dict) -> dict:
        from panopticapi.utils import rgb2id

        dataset_dict = copy.deepcopy(dataset_dict)
        pan_file = dataset_dict.get("pan_seg_file_name")
        if pan_file is None:
            raise KeyError(
                f"{dataset_dict.get('file_name')}: no 'pan_seg_file_name'; the 'panoptic' mapper "
                "needs a standard COCO-panoptic dataset (e.g. coco_2017_train_panoptic)"
            )
        pan_seg = read_image_checked(pan_file, "RGB")
        segments_info = dataset_dict.pop("segments_info")
        image_shape, transforms, pan_seg = self._read(dataset_dict, sem_seg=pan_seg)
        if not self.is_train:
            return dataset_dict
        pan_ids = rgb2id(pan_seg)
        sem_seg = np.full(pan_ids.shape, self.ignore_label, dtype=np.int64)
        masks, classes, is_thing = [], [], []
        for seg in segments_info:
            mask = pan_ids == seg["id"]
            if seg.get("iscrowd", 0):
                continue
            sem_seg[mask] = seg["category_id"]
            if mask.sum() < self.min_instance_area:
                continue
            masks.append(mask)
            classes.append(seg["category_id"])
            is_thing.append(bool(seg.get("isthing", True)))
        stacked = np.stack(masks) if masks else np.zeros((0, *image_shape), bool)
        inst = _masks_to_instances(stacked, classes, image_shape)
        inst.gt_is_thing = torch.as_tensor(is_thing, dtype=torch.bool)
        dataset_dict["instances"] = inst
        dataset_dict["sem_seg"] = torch.as_tensor(sem_seg)
        return dataset_dict


@register_mapper("semantic")
class SemanticDatasetMapper(_BaseMapper):
    """Semantic label PNG → ``sem_seg`` plus one instance mask per present class."""

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        sem_file = dataset_dict.get("sem_seg_file_name")
        if sem_file is None:
            raise KeyError(f"{dataset_dict.get('file_name')}: no 'sem_seg_file_name' to read")
        # uint8 through the augmentations (PIL nearest resize), int64 afterwards
        sem_seg = read_image_checked(sem_file, "L").squeeze(-1)
        image_shape, transforms, sem_seg = self._read(dataset_dict, sem_seg=sem_seg)
        if not self.is_train:
            return dataset_dict
        sem_seg = sem_seg.astype(np.int64)
        classes = [int(c) for c in np.unique(sem_seg) if c != self.ignore_label]
        masks = (
            np.stack([sem_seg == c for c in classes])
            if classes
            else np.zeros((0, *image_shape), bool)
        )
        dataset_dict["instances"] = _masks_to_instances(masks, classes, image_shape)
        dataset_dict["sem_seg"] = torch.as_tensor(sem_seg)
        return dataset_dict


@register_mapper("detectron2")
def _detectron2_mapper(cfg: CfgNode, is_train: bool = True) -> DatasetMapper:
    """Detectron2's own DatasetMapper (used by the Mask R-CNN / Panoptic FPN baselines)."""
    return DatasetMapper(cfg, is_train=is_train)


def _frame_rle(segm: dict, height: int, width: int) -> dict:
    """An uncompressed RLE (``counts`` a list, as YouTube-VIS releases them) made compressed."""
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        import pycocotools.mask as mask_util

        return mask_util.frPyObjects(segm, height, width)
    return segm


@register_mapper("video_instance")
class VideoInstanceDatasetMapper(_BaseMapper):
    """YouTube-VIS video dict -> ``NUM_FRAMES`` frames of the clip, in temporal order, under one
    augmentation drawn once per clip (so a flip or a scale holds for every frame).

    Training samples a random reference frame and the other frames within
    ``SAMPLING_FRAME_RANGE`` of it (MaskTrack R-CNN's reference-frame sampling, generalised to
    ``NUM_FRAMES``; with replacement when the clip is too short); testing returns every frame.
    Output: ``images`` (list of [3,H,W] uint8), ``frame_indices``, ``file_names``, ``video_id``,
    ``length``, ``height``/``width`` and, in training, ``instances``: one Instances per frame
    with ``gt_classes``, ``gt_masks`` (BitMasks), ``gt_boxes`` (from the masks) and ``gt_ids``
    (the track ids, constant across frames).
    """

    serves_test = True

    @configurable
    def __init__(self, *, num_frames: int, sampling_frame_range: int, **kwargs):
        """
        Args:
            num_frames: frames per training sample (>= 1).
            sampling_frame_range: the sampled frames lie within this distance of the reference.
            kwargs: :class:`_BaseMapper`'s arguments.
        """
        super().__init__(**kwargs)
        if num_frames < 1 or sampling_frame_range < 0:
            raise ValueError(
                f"INPUT.VIDEO.NUM_FRAMES={num_frames} must be >= 1 and "
                f"INPUT.VIDEO.SAMPLING_FRAME_RANGE={sampling_frame_range} >= 0"
            )
        self.num_frames = num_frames
        self.sampling_frame_range = sampling_frame_range

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        ret["num_frames"] = cfg.INPUT.VIDEO.NUM_FRAMES
        ret["sampling_frame_range"] = cfg.INPUT.VIDEO.SAMPLING_FRAME_RANGE
        return ret

    def sample_frames(self, length: int) -> list[int]:
        """Sorted frame indices of one training sample (global NumPy RNG, for exact resume)."""
        ref = int(np.random.randint(length))
        lo = max(0, ref - self.sampling_frame_range)
        hi = min(length, ref + self.sampling_frame_range + 1)
        others = [i for i in range(lo, hi) if i != ref] or [ref]
        k = self.num_frames - 1
        picked = np.random.choice(others, size=k, replace=len(others) < k).tolist()
        return sorted([ref, *picked])

    def __call__(self, video: dict) -> dict:
        length = int(video["length"])
        frames = self.sample_frames(length) if self.is_train else list(range(length))
        out = {k: video[k] for k in ("video_id", "length", "height", "width") if k in video}
        out["frame_indices"] = frames
        out["file_names"] = [video["file_names"][f] for f in frames]
        images, instances, transforms = [], [], None
        for f in frames:
            image = read_image_checked(video["file_names"][f], self.image_format)
            utils.check_image_size({**out, "file_name": video["file_names"][f]}, image)
            if transforms is None:  # drawn on the first frame, applied to all
                aug_input = T.AugInput(image)
                transforms = self.augmentations(aug_input)
                image = aug_input.image
            else:
                image = transforms.apply_image(image)
            images.append(torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))))
            if self.is_train:
                instances.append(self._frame_instances(video, f, transforms, image.shape[:2]))
        out["images"] = images
        if self.is_train:
            out["instances"] = instances
        return out

    def _frame_instances(
        self, video: dict, frame: int, transforms: T.TransformList, image_shape: tuple[int, int]
    ) -> Instances:
        annos = [
            dict(a, segmentation=_frame_rle(a["segmentation"], video["height"], video["width"]))
            for a in video["annotations"][frame]
            if a.get("iscrowd", 0) == 0
        ]
        validate_annotations(annos, video["file_names"][frame], need_masks=True)
        annos = [utils.transform_instance_annotations(a, transforms, image_shape) for a in annos]
        if not annos:
            inst = _masks_to_instances(np.zeros((0, *image_shape), bool), [], image_shape)
            inst.gt_ids = torch.zeros((0,), dtype=torch.int64)
            return inst
        inst = utils.annotations_to_instances(annos, image_shape, mask_format="bitmask")
        inst.gt_ids = torch.as_tensor([a["id"] for a in annos], dtype=torch.int64)
        inst = inst[inst.gt_masks.tensor.flatten(1).sum(1) >= self.min_instance_area]
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        return inst
