"""The ``FastInst`` meta-architecture: backbone, PPM-FPN, IA-guided queries, dual-path decoder.

Provenance: the official ``FastInst`` meta-arch (Mask2Former skeleton: pad to 32 in the model,
GT masks padded into the input frame, Mask2Former-style inference) with the shared QuerySeg
matcher and criterion instead of private copies; differences: the criterion applies its own
weights (unweighted keys are an error, not silently dropped), instance boxes come from the masks,
and inputs/labels are checked against the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances, PolygonMasks
from detectron2.utils.memory import retry_if_cuda_oom
from torch import Tensor, nn
from torch.nn import functional as F

from common.modeling.criterion import SetCriterion
from common.modeling.matcher import HungarianMatcher, costs_from_config
from common.modeling.meta_arch import (
    backbone_size_divisibility,
    normalize_and_pad,
    num_classes,
    padding_multiples,
)

from .inference import (
    instance_inference,
    instances_from_unique_probs,
    panoptic_inference,
    select_topk,
    semantic_inference,
    thing_class_ids,
)

__all__ = ["FastInst", "build_fastinst_criterion"]


def build_fastinst_criterion(cfg: CfgNode, num_classes: int) -> SetCriterion:
    """FastInst's matcher and losses on the shared :class:`~common.modeling.criterion.SetCriterion`.

    Matcher: softmax class 2, point BCE 5, point dice 5 (12544 shared random points), location
    1000; ``MODEL.MATCHER.COSTS`` replaces these terms (the loss weights stay). Losses: CE
    (no-object 0.1) 2, point-sampled BCE 5 and dice 5 on every output; the proposal loss 20
    (dense proposal matching) on the final output only. With ``QUERY_TYPE "learned"`` (the
    query-type ablation) the queries have no location and no proposal map: no location cost,
    no proposal loss.
    """
    f = cfg.MODEL.FASTINST
    ia_queries = f.QUERY_TYPE == "ia_guided"
    points = {"num_points": f.TRAIN_NUM_POINTS}
    if cfg.MODEL.MATCHER.COSTS:  # the shared key: any registered terms
        costs = costs_from_config(
            cfg,
            (),
            {"point_bce": points, "point_dice": points},
            ("pred_logits", "pred_masks", *(["pred_locations"] if ia_queries else [])),
            "FastInst",
        )
    else:
        costs = [
            ("softmax_class", f.CLASS_WEIGHT, {}),
            ("point_bce", f.MASK_WEIGHT, points),
            ("point_dice", f.DICE_WEIGHT, points),
        ]
        if ia_queries:
            costs.append(("location", f.LOCATION_WEIGHT, {}))
    matcher = HungarianMatcher(costs)
    losses = [
        ("labels_ce", {"no_object_weight": f.NO_OBJECT_WEIGHT}),
        (
            "masks_point",
            {
                "num_points": f.TRAIN_NUM_POINTS,
                "oversample_ratio": f.OVERSAMPLE_RATIO,
                "importance_sample_ratio": f.IMPORTANCE_SAMPLE_RATIO,
            },
        ),
    ]
    weight_dict = {
        "loss_ce": f.CLASS_WEIGHT,
        "loss_mask": f.MASK_WEIGHT,
        "loss_dice": f.DICE_WEIGHT,
    }
    if ia_queries:
        losses.append(
            ("proposals", {"class_weight": f.CLASS_WEIGHT, "location_weight": f.LOCATION_WEIGHT})
        )
        weight_dict["loss_proposal"] = f.PROPOSAL_WEIGHT
    return SetCriterion(
        matcher, num_classes, losses, weight_dict, aux_losses=["labels_ce", "masks_point"]
    )


@META_ARCH_REGISTRY.register()
class FastInst(nn.Module):
    """FastInst (He et al., "FastInst: A Simple Query-Based Model for Real-Time Instance
    Segmentation", CVPR 2023). Differs from the official code in the initialised positional
    embedding, the shared matcher/criterion, and boxes derived from masks at inference."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: SetCriterion,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int | tuple[int, int] = 32,
        metadata: Any = None,
        instance_on: bool = True,
        semantic_on: bool = False,
        panoptic_on: bool = False,
        test_topk_per_image: int = 100,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        sem_seg_postprocess_before_inference: bool = False,
        fast_inference: bool = False,
    ):
        """
        Args:
            backbone: Detectron2 backbone giving res3-res5.
            sem_seg_head: :class:`~fastinst.head.FastInstHead` (pixel decoder + decoder).
            criterion: shared set criterion with FastInst's matcher (its weights applied).
            num_classes: C foreground classes.
            pixel_mean, pixel_std: per-channel input normalisation.
            size_divisibility: pad inputs to a multiple of this (-1: the backbone's), or
                (training, test) multiples (``common.modeling.meta_arch.padding_multiples``).
            metadata: dataset metadata (thing ids for panoptic inference).
            instance_on, semantic_on, panoptic_on: which outputs inference returns.
            test_topk_per_image: detections per image (instance inference).
            object_mask_threshold, overlap_threshold: panoptic merge thresholds.
            sem_seg_postprocess_before_inference: resize mask logits to the output size before
                the semantic merge (always done for instance/panoptic outputs).
            fast_inference: instance-only models upsample only the selected queries' masks
                to the output size (``MODEL.FAST_INFERENCE``; the same results).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_classes = num_classes
        if isinstance(size_divisibility, int):
            if size_divisibility < 0:
                size_divisibility = backbone_size_divisibility(backbone)
            size_divisibility = (size_divisibility, size_divisibility)
        self.size_divisibility = tuple(int(d) for d in size_divisibility)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.metadata = metadata
        self.thing_ids = thing_class_ids(metadata) if metadata is not None else set()
        if not (instance_on or semantic_on or panoptic_on):
            raise ValueError(
                "enable at least one of MODEL.FASTINST.TEST.{INSTANCE,SEMANTIC,PANOPTIC}_ON"
            )
        self.instance_on, self.semantic_on, self.panoptic_on = instance_on, semantic_on, panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.resize_before_inference = (
            sem_seg_postprocess_before_inference or instance_on or panoptic_on
        )
        self.fast_inference = fast_inference

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        n_classes = num_classes(cfg)
        backbone = build_backbone(cfg)
        if cfg.MODEL.SEM_SEG_HEAD.NAME == "SemSegFPNHead":  # detectron2's default: not ours
            from .head import FastInstHead

            sem_seg_head = FastInstHead(cfg, backbone.output_shape())
        else:
            sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        test = cfg.MODEL.FASTINST.TEST
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_fastinst_criterion(cfg, n_classes),
            "num_classes": n_classes,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": padding_multiples(backbone, cfg),
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
            "instance_on": test.INSTANCE_ON,
            "semantic_on": test.SEMANTIC_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "sem_seg_postprocess_before_inference": test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "fast_inference": cfg.MODEL.FAST_INFERENCE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: list[dict[str, Any]]) -> dict[str, Tensor] | list[dict]:
        """
        Args:
            batched_inputs: mapper outputs: ``image`` [3, H, W] uint8/float; in training
                ``instances`` (``gt_classes`` [G], ``gt_masks`` [G, H, W]); optional
                ``height``/``width`` (output size in inference).
        Returns:
            training: the criterion's weighted losses (``loss_ce``, ``loss_mask``, ``loss_dice``,
            their ``_<i>`` copies for the 2L aux/guided outputs, ``loss_proposal``);
            inference: one dict per image with ``instances`` / ``sem_seg`` [C, h, w] /
            ``panoptic_seg`` as enabled.
        """
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.inference(self.inference_core(images.tensor), batched_inputs, images)
        features = self.backbone(images.tensor)
        if any("instances" not in x for x in batched_inputs):
            raise KeyError("FastInst training needs 'instances' in every input dict")
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        targets = self.prepare_targets(gt, images.tensor.shape[-2:])
        outputs = self.sem_seg_head(features, targets, self.criterion.matcher)
        return self.criterion(outputs, targets)

    core_output_names = ("pred_logits", "pred_masks")

    def inference_core(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The traceable part of inference (what ``tools/export_model.py`` exports).

        Args:
            images: [B, 3, H_pad, W_pad] normalised, padded images.
            image_sizes: unused (the common core signature; see ``common.modeling.export``).
        Returns:
            ``pred_logits`` [B, Q, C+1] and ``pred_masks`` [B, Q, H_pad / 8, W_pad / 8] logits of
            the last decoder layer.
        """
        outputs = self.sem_seg_head(self.backbone(images))
        return {k: outputs[k] for k in self.core_output_names}

    def core_postprocess(
        self, outputs: dict[str, Tensor], batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Any]]:
        """:meth:`inference` on :meth:`inference_core`'s outputs (from any runtime)."""
        return self.inference(outputs, batched_inputs, images)

    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        """Normalise and pad the images to ``size_divisibility`` (training or test). Returns an
        ImageList whose tensor is [B, 3, H_pad, W_pad]."""
        div = self.size_divisibility[0 if self.training else 1]
        return normalize_and_pad(batched_inputs, self.pixel_mean, self.pixel_std, div, "FastInst")

    def prepare_targets(
        self, instances: list[Instances], padded_size: Sequence[int]
    ) -> list[dict[str, Any]]:
        """Targets in the shared format, masks zero-padded into the padded input frame.

        Returns:
            per image: ``labels`` [G] long, ``masks`` [G, H_pad, W_pad] float, ``boxes`` [G, 4]
            absolute xyxy (when present), ``image_size`` (h, w).
        """
        hp, wp = int(padded_size[0]), int(padded_size[1])
        targets = []
        for inst in instances:
            labels = inst.gt_classes.long()
            if labels.numel() and int(labels.max()) >= self.num_classes:
                raise ValueError(
                    f"ground-truth class {int(labels.max())} >= MODEL.NUM_CLASSES "
                    f"({self.num_classes})"
                )
            h, w = inst.image_size
            gt_masks = inst.gt_masks
            if isinstance(gt_masks, PolygonMasks):
                gt_masks = BitMasks.from_polygon_masks(gt_masks, h, w)
            gt_masks = gt_masks.tensor if isinstance(gt_masks, BitMasks) else gt_masks
            masks = torch.zeros((len(labels), hp, wp), dtype=torch.float32, device=self.device)
            masks[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks.to(self.device)
            target = {"labels": labels, "masks": masks, "image_size": (h, w)}
            if inst.has("gt_boxes"):
                target["boxes"] = inst.gt_boxes.tensor
            targets.append(target)
        return targets

    def inference(
        self, outputs: dict[str, Any], batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Any]]:
        """Upsample the 1/8 mask logits to the padded input, crop and resize to each image's
        output size, then run the enabled post-processing."""
        if self.fast_inference and self.instance_on and not (self.semantic_on or self.panoptic_on):
            return self.selected_instance_inference(outputs, batched_inputs, images)
        mask_cls_all = outputs["pred_logits"]
        mask_pred_all = F.interpolate(
            outputs["pred_masks"],
            size=images.tensor.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        results = []
        for mask_cls, mask_pred, x, image_size in zip(
            mask_cls_all, mask_pred_all, batched_inputs, images.image_sizes
        ):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            if self.resize_before_inference:
                mask_pred = retry_if_cuda_oom(sem_seg_postprocess)(
                    mask_pred, image_size, height, width
                )
                mask_cls = mask_cls.to(mask_pred)
            result: dict[str, Any] = {}
            if self.semantic_on:
                sem = retry_if_cuda_oom(semantic_inference)(mask_cls, mask_pred)
                if not self.resize_before_inference:
                    sem = retry_if_cuda_oom(sem_seg_postprocess)(sem, image_size, height, width)
                result["sem_seg"] = sem
            if self.panoptic_on:
                result["panoptic_seg"] = retry_if_cuda_oom(panoptic_inference)(
                    mask_cls,
                    mask_pred,
                    object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold,
                    thing_ids=self.thing_ids,
                )
            if self.instance_on:
                result["instances"] = retry_if_cuda_oom(instance_inference)(
                    mask_cls,
                    mask_pred,
                    topk=self.test_topk_per_image,
                    keep_classes=self.thing_ids if self.panoptic_on else None,
                )
            results.append(result)
        return results

    def selected_instance_inference(
        self, outputs: dict[str, Tensor], batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Any]]:
        """:meth:`inference` for instance-only models, upsampling (to the padded input, then the
        output size, as there) only the masks of the queries that the top-k selection keeps:
        the same instances, without the full-resolution work on the other queries."""
        results = []
        padded = images.tensor.shape[-2:]
        for mask_cls, low_res, x, image_size in zip(
            outputs["pred_logits"], outputs["pred_masks"], batched_inputs, images.image_sizes
        ):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            scores, labels, query_idx = select_topk(mask_cls, topk=self.test_topk_per_image)
            queries, inverse = query_idx.unique(return_inverse=True)
            masks = F.interpolate(
                low_res[queries][None], size=padded, mode="bilinear", align_corners=False
            )[0]
            if (height, width) == tuple(image_size):  # the resize would be an exact copy
                masks = masks[:, : image_size[0], : image_size[1]]
            else:
                masks = sem_seg_postprocess(masks, image_size, height, width)
            probs = masks.float().sigmoid()
            instances = instances_from_unique_probs(scores, labels, probs, inverse)
            results.append({"instances": instances})
        return results
