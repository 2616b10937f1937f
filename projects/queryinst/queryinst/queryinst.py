"""QueryInst meta-architecture (Fang et al., "Instances as Queries", ICCV 2021).

Provenance: follows ``hustvl/QueryInst`` (``QueryInst`` detector + ``QueryRoIHead``): Sparse
R-CNN's learned proposals refined by 6 DIIHead stages, each with its own dynamic mask head, all
stages matched (on their own detached outputs) and supervised in parallel; inference takes the
top-k (query, class) pairs of the last stage and pastes that stage's masks, no NMS. Differences:
Detectron2 backbone/FPN/poolers/box transform, the shared matcher and criterion, and boxes are
clipped to the image after the masks are pasted (see the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from detectron2.config import configurable
from detectron2.layers import paste_masks_in_image
from detectron2.modeling import FPN, META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from common.modeling.criterion import SetCriterion
from common.modeling.loss_terms import matched_labels, src_permutation_idx
from common.modeling.matcher import HungarianMatcher, costs_from_config
from common.modeling.meta_arch import (
    backbone_size_divisibility,
    normalize_and_pad,
    num_classes,
    padding_multiples,
)

from . import loss as _loss  # noqa: F401  (registers the "roi_mask_dice" loss term)
from .roi_head import EmbeddingRPNHead, QueryRoIHead

__all__ = ["QueryInst"]


def _xavier_fpn_(backbone: nn.Module) -> None:
    """Initialise the FPN convs as mmdet's ``FPN`` (``init_cfg`` Xavier uniform, gain 1, zero
    bias) instead of Detectron2's ``c2_xavier_fill`` (Kaiming uniform a=1, bound sqrt(3/fan_in)):
    the same for the 3x3 outputs, 13-25 % smaller std on the laterals from 512-2048 channels
    (checked by tests/parity). A backbone without ``lateral_convs`` is left alone."""
    for module in backbone.modules():
        if isinstance(module, FPN):
            for conv in [*module.lateral_convs, *module.output_convs]:
                nn.init.xavier_uniform_(conv.weight)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)


@META_ARCH_REGISTRY.register()
class QueryInst(nn.Module):
    """QueryInst: query-based instance segmentation with parallel dynamic mask heads.

    Training returns the criterion's weighted losses with keys ``loss_{cls,bbox,giou,mask}_s<t>``
    for every stage t; inference returns ``[{"instances": Instances}]`` with ``pred_boxes``,
    ``scores``, ``pred_classes`` and ``pred_masks`` at the requested output size.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        rpn_head: EmbeddingRPNHead,
        roi_head: QueryRoIHead,
        criterion: SetCriterion,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        test_topk: int = 100,
        mask_threshold: float = 0.5,
        size_divisibility: tuple[int, int] | None = None,
    ):
        """
        Args:
            backbone: ResNet/Swin + FPN returning the features named by ``roi_head.in_features``.
            rpn_head: the learned proposal boxes and proposal features.
            roi_head: the stages (DIIHeads, dynamic mask heads, poolers, box transform).
            criterion: the shared SetCriterion; its ``matcher`` matches every stage.
            num_classes: K thing classes.
            pixel_mean, pixel_std: input normalisation (RGB ImageNet statistics).
            test_topk: detections per image (official ``max_per_img`` = number of queries).
            mask_threshold: probability threshold of the pasted masks.
            size_divisibility: (training, test) padding multiples; None: the backbone's.
        """
        super().__init__()
        self.backbone = backbone
        self.rpn_head = rpn_head
        self.roi_head = roi_head
        self.criterion = criterion
        self.num_classes = num_classes
        self.test_topk = test_topk
        self.mask_threshold = mask_threshold
        if size_divisibility is None:
            size_divisibility = (backbone_size_divisibility(backbone),) * 2
        self.size_divisibility = tuple(size_divisibility)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> dict[str, Any]:
        q = cfg.MODEL.QUERYINST
        n_classes = num_classes(cfg)
        backbone = build_backbone(cfg)
        if q.FPN_INIT == "xavier_uniform":
            _xavier_fpn_(backbone)
        elif q.FPN_INIT != "c2_xavier":
            raise ValueError(
                f"MODEL.QUERYINST.FPN_INIT={q.FPN_INIT!r}: expected 'xavier_uniform' (mmdet's "
                "FPN init) or 'c2_xavier' (Detectron2's)"
            )
        roi_head = QueryRoIHead(cfg, backbone.output_shape())
        dim = roi_head.bbox_head[0].in_channels
        focal = {"alpha": q.FOCAL_ALPHA, "gamma": q.FOCAL_GAMMA}
        if cfg.MODEL.MATCHER.COSTS:  # the shared key: any registered box/class terms
            costs = costs_from_config(
                cfg, (), {"focal_class": focal}, ("pred_logits", "pred_boxes"), "QueryInst"
            )
        else:
            costs = [
                ("focal_class", q.COST_CLASS, focal),
                ("box_l1", q.COST_L1, {}),
                ("giou", q.COST_GIOU, {}),
            ]
        matcher = HungarianMatcher(costs)
        stage_weights = list(q.STAGE_LOSS_WEIGHTS) or [1.0] * q.NUM_STAGES
        if len(stage_weights) != q.NUM_STAGES:
            raise ValueError(
                f"MODEL.QUERYINST.STAGE_LOSS_WEIGHTS has {len(stage_weights)} entries for "
                f"NUM_STAGES={q.NUM_STAGES}"
            )
        criterion = SetCriterion(
            matcher,
            n_classes,
            losses=[
                ("labels_focal", {"alpha": q.FOCAL_ALPHA, "gamma": q.FOCAL_GAMMA}),
                "boxes",
                ("roi_mask_dice", {"eps": q.DICE_EPS}),
            ],
            weight_dict={
                "loss_cls": q.CLASS_WEIGHT,
                "loss_bbox": q.L1_WEIGHT,
                "loss_giou": q.GIOU_WEIGHT,
                "loss_mask": q.MASK_WEIGHT,
            },
            normalizer="num_matched",
            key_style="stage",
            stage_loss_weights=stage_weights,
            # without parallel supervision only the last stage predicts (and learns) masks
            aux_losses=None if q.PARALLEL_MASK_SUPERVISION else ["labels_focal", "boxes"],
        )
        return {
            "backbone": backbone,
            "rpn_head": EmbeddingRPNHead(q.NUM_PROPOSALS, dim),
            "roi_head": roi_head,
            "criterion": criterion,
            "num_classes": n_classes,
            "size_divisibility": padding_multiples(backbone, cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "mask_threshold": q.MASK_THRESHOLD,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, batched_inputs: list[dict[str, Any]]):
        """
        Args:
            batched_inputs: Detectron2 mapper dicts: ``image`` [3, H, W] (cfg.INPUT.FORMAT),
                optional ``height``/``width`` (output size) and, in training, ``instances``
                with ``gt_classes`` [G], ``gt_boxes`` [G, 4] and ``gt_masks`` BitMasks [G, H, W].

        Returns:
            training: ``{loss_<term>_s<t>: 0-d tensor}``; inference: one dict per image with
            ``instances``.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.roi_head.select_features(self.backbone(images.tensor))
        image_whwh = torch.tensor(
            [[w, h, w, h] for h, w in images.image_sizes], dtype=torch.float32, device=self.device
        )
        boxes, proposal_features = self.rpn_head(image_whwh)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            return self.forward_train(features, boxes, proposal_features, targets)
        return self.inference(features, boxes, proposal_features, batched_inputs, images)

    def forward_train(
        self,
        features: list[Tensor],
        boxes: Tensor,
        proposal_features: Tensor,
        targets: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """Run all stages, match each on its own detached outputs, run each stage's mask head on
        its matched queries, and return the criterion's losses for all stages.

        Args:
            features: FPN levels [B, C, H_l, W_l], finest first.
            boxes: [B, N, 4] initial proposal boxes (absolute xyxy).
            proposal_features: [B, N, C] initial proposal features.
            targets: B dicts (``labels``, ``boxes``, ``masks``, ``image_size``).
        """
        outputs, _ = self.train_stages(features, boxes, proposal_features, targets)
        return self.criterion(outputs, targets)

    def train_stages(
        self,
        features: list[Tensor],
        boxes: Tensor,
        proposal_features: Tensor,
        targets: list[dict[str, Any]],
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The stage loop of :meth:`forward_train` without the criterion.

        Returns:
            the criterion's input (last stage's outputs with ``pred_matching_indices`` and
            ``aux_outputs``) and the last stage's raw outputs (``object_features`` [B, N, C],
            ``pred_boxes`` [B, N, 4], ...), e.g. for a tracking head.
        """
        stage_outputs = []
        for stage in range(self.roi_head.num_stages):
            out = self.roi_head.box_stage(stage, features, boxes, proposal_features)
            pred = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
            indices = self.criterion.matcher(pred, targets)
            pred["pred_matching_indices"] = indices
            if self.roi_head.has_mask_head(stage):
                pred["pred_roi_masks"] = self._matched_mask_logits(
                    stage, features, out, indices, targets
                )
            stage_outputs.append(pred)
            boxes = out["pred_boxes"].detach()
            proposal_features = out["object_features"]
        outputs = dict(stage_outputs[-1], aux_outputs=stage_outputs[:-1])
        return outputs, out

    def _matched_mask_logits(
        self,
        stage: int,
        features: list[Tensor],
        out: dict[str, Tensor],
        indices: list[tuple[Tensor, Tensor]],
        targets: list[dict[str, Any]],
    ) -> Tensor:
        """GT-class mask logits [M, S, S] of the matched queries (src_permutation_idx order)."""
        b_idx, q_idx = src_permutation_idx(indices, self.device)
        heads = self.roi_head.mask_head
        mask_head = heads[stage if len(heads) == self.roi_head.num_stages else 0]
        side = 2 * self.roi_head.mask_pooler.output_size[0]
        if b_idx.numel() == 0:
            # no positives: a zero-size output still touching every mask-head parameter, so that
            # DDP sees gradients for them (and BatchNorm never sees an empty batch)
            anchor = (
                sum(p.sum() for p in mask_head.parameters()) + out["attn_features"].sum()
            ) * 0.0
            return anchor + out["attn_features"].new_zeros((0, side, side))
        pred_boxes = out["pred_boxes"].detach()
        roi_boxes = [pred_boxes[b, src.to(self.device)] for b, (src, _) in enumerate(indices)]
        logits = self.roi_head.mask_stage(
            stage, features, roi_boxes, out["attn_features"][b_idx, q_idx]
        )
        labels = matched_labels(targets, indices, self.device)
        return logits[torch.arange(len(labels), device=self.device), labels]

    @torch.no_grad()
    def inference(
        self,
        features: list[Tensor],
        boxes: Tensor,
        proposal_features: Tensor,
        batched_inputs: list[dict[str, Any]],
        images: ImageList,
    ) -> list[dict[str, Instances]]:
        """Run all stages; take the top-k (query, class) scores of the last stage; paste the
        last stage's masks of those queries at the output size (no NMS)."""
        for stage in range(self.roi_head.num_stages):
            out = self.roi_head.box_stage(stage, features, boxes, proposal_features)
            boxes = out["pred_boxes"]
            proposal_features = out["object_features"]
        top_scores, top_query, top_labels = self.select_topk(out["pred_logits"])
        # the mask head runs once per distinct selected query (a query can hold several labels)
        uniq = [q.unique(return_inverse=True) for q in top_query]
        mask_logits = self.roi_head.mask_stage(
            self.roi_head.num_stages - 1,
            features,
            [boxes[i, u] for i, (u, _) in enumerate(uniq)],
            torch.cat([out["attn_features"][i, u] for i, (u, _) in enumerate(uniq)]),
        )
        results, start = [], 0
        for i, (u, inverse) in enumerate(uniq):
            probs = mask_logits[start + inverse, top_labels[i]].sigmoid()  # [topk, S, S]
            start += len(u)
            height = batched_inputs[i].get("height", images.image_sizes[i][0])
            width = batched_inputs[i].get("width", images.image_sizes[i][1])
            inst = self.postprocess(
                boxes[i, top_query[i]],
                top_scores[i],
                top_labels[i],
                probs,
                images.image_sizes[i],
                (height, width),
            )
            results.append({"instances": inst})
        return results

    def select_topk(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k (query, class) pairs of [B, N, K] class logits by sigmoid score.

        Returns:
            (scores, query indices, labels), each [B, topk].
        """
        scores = logits.sigmoid()
        b, n, k = scores.shape
        topk = min(self.test_topk, n * k)
        top_scores, top_idx = scores.flatten(1).topk(topk, dim=1)
        return top_scores, top_idx // k, top_idx % k

    core_output_names = ("pred_boxes", "scores", "pred_classes", "mask_logits")

    def inference_core(self, images: Tensor, image_sizes: Tensor) -> dict[str, Tensor]:
        """The traceable part of inference (what ``tools/export_model.py`` exports): all
        stages, the top-k selection, and the last stage's mask head on the selected queries
        (once per pair: :meth:`inference` runs it once per distinct query, same values).

        Args:
            images: [B, 3, H_pad, W_pad] normalised, padded images.
            image_sizes: [B, 2] (h, w) of the unpadded images (the initial proposal boxes).
        Returns:
            ``pred_boxes`` [B, T, 4] absolute xyxy in the input frame, ``scores`` [B, T],
            ``pred_classes`` [B, T] and ``mask_logits`` [B, T, S, S] of the selected pairs.
        """
        features = self.roi_head.select_features(self.backbone(images))
        image_whwh = image_sizes.to(torch.float32)[:, [1, 0, 1, 0]]
        boxes, proposal_features = self.rpn_head(image_whwh)
        for stage in range(self.roi_head.num_stages):
            out = self.roi_head.box_stage(stage, features, boxes, proposal_features)
            boxes, proposal_features = out["pred_boxes"], out["object_features"]
        top_scores, top_query, top_labels = self.select_topk(out["pred_logits"])
        b, t = top_query.shape
        batch = torch.arange(b, device=images.device)[:, None].expand(b, t)
        sel_boxes = boxes[batch, top_query]  # [B, T, 4]
        mask_logits = self.roi_head.mask_stage(
            self.roi_head.num_stages - 1,
            features,
            list(sel_boxes.unbind(0)),
            out["attn_features"][batch, top_query].flatten(0, 1),
        )  # [B * T, K, S, S]
        mask_logits = mask_logits[torch.arange(b * t, device=images.device), top_labels.flatten()]
        return {
            "pred_boxes": sel_boxes,
            "scores": top_scores,
            "pred_classes": top_labels,
            "mask_logits": mask_logits.view(b, t, *mask_logits.shape[-2:]),
        }

    def core_postprocess(
        self, outputs: dict[str, Tensor], batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Instances]]:
        """:meth:`postprocess` of :meth:`inference_core`'s outputs (from any runtime)."""
        results = []
        for i, image_size in enumerate(images.image_sizes):
            height = batched_inputs[i].get("height", image_size[0])
            width = batched_inputs[i].get("width", image_size[1])
            inst = self.postprocess(
                outputs["pred_boxes"][i],
                outputs["scores"][i],
                outputs["pred_classes"][i],
                outputs["mask_logits"][i].sigmoid(),
                image_size,
                (height, width),
            )
            results.append({"instances": inst})
        return results

    def postprocess(
        self,
        boxes: Tensor,
        scores: Tensor,
        labels: Tensor,
        mask_probs: Tensor,
        image_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Instances:
        """Rescale one image's detections to ``output_size`` and paste their masks.

        Args:
            boxes: [D, 4] absolute xyxy in the input frame; scores [D]; labels [D].
            mask_probs: [D, S, S] RoI mask probabilities.
            image_size: (h, w) of the unpadded input; output_size: (H, W) wanted.

        Returns:
            Instances of size (H, W): pred_boxes (clipped), scores, pred_classes, pred_masks
            [D, H, W] bool (pasted with the unclipped boxes the masks were predicted in; empty
            for boxes outside the image).
        """
        out_h, out_w = int(output_size[0]), int(output_size[1])
        scale = boxes.new_tensor([out_w / image_size[1], out_h / image_size[0]] * 2)
        out_boxes = Boxes(boxes * scale)
        result = Instances((out_h, out_w))
        # paste only boxes that overlap the image (Detectron2's paste needs that); others: empty
        x0, y0, x1, y1 = out_boxes.tensor.unbind(1)
        inside = (x0 < out_w) & (y0 < out_h) & (x1 > 0) & (y1 > 0) & (x1 > x0) & (y1 > y0)
        masks = torch.zeros((len(boxes), out_h, out_w), dtype=torch.bool, device=boxes.device)
        if bool(inside.any()):
            masks[inside] = paste_masks_in_image(
                mask_probs[inside], out_boxes.tensor[inside], (out_h, out_w), self.mask_threshold
            )
        result.pred_masks = masks
        out_boxes.clip((out_h, out_w))
        result.pred_boxes = out_boxes
        result.scores = scores
        result.pred_classes = labels
        return result

    # ---- input handling --------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        """Normalise and pad the images (``common.modeling.meta_arch.padding_multiples``)."""
        div = self.size_divisibility[0 if self.training else 1]
        return normalize_and_pad(batched_inputs, self.pixel_mean, self.pixel_std, div, "QueryInst")

    def prepare_targets(
        self, batched_inputs: list[dict[str, Any]], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """Per-image target dicts for the matcher and criterion: ``labels`` [G] long,
        ``boxes`` [G, 4] absolute xyxy, ``masks`` [G, H, W] bool, ``image_size`` (h, w)."""
        targets = []
        for x, size in zip(batched_inputs, image_sizes):
            if "instances" not in x:
                raise KeyError("QueryInst training needs 'instances' in every input dict")
            inst = x["instances"].to(self.device)
            targets.append(
                {
                    "labels": inst.gt_classes.long(),
                    "boxes": inst.gt_boxes.tensor,
                    "masks": inst.gt_masks.tensor,
                    "image_size": size,
                }
            )
        labels = torch.cat([t["labels"] for t in targets])
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"ground-truth class {int(labels.max())} >= MODEL.NUM_CLASSES={self.num_classes}"
            )
        return targets
