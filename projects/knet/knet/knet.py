"""K-Net meta-architecture for instance and panoptic segmentation."""

from __future__ import annotations

from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import Tensor, nn
from torch.nn import functional as F

from common.modeling.criterion import SetCriterion
from common.modeling.matcher import COST_TERMS, HungarianMatcher, costs_from_config
from common.modeling.meta_arch import normalize_and_pad, num_classes, padding_multiples
from common.modeling.neck import PixelDecoderNeck

from .kernel_head import ConvKernelHead
from .kernel_update_head import KernelUpdateHead
from .losses import KNetMatcher
from .neck import FPNNeck
from .postprocessing import instance_inference, panoptic_inference


@META_ARCH_REGISTRY.register()
class KNet(nn.Module):
    """K-Net: Towards Unified Image Segmentation (Zhang et al., NeurIPS 2021), detection codebase.

    Backbone -> FPN neck (P2..P5) -> :class:`ConvKernelHead` (stage 0) -> S
    :class:`KernelUpdateHead` s.
    Differs from ZwwWayne/K-Net only where the README says (mask-derived boxes, Detectron2
    panoptic format, no 2-images-per-GPU target bug, Detectron2 FPN init).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: FPNNeck,
        kernel_head: ConvKernelHead,
        kernel_update_heads: list[KernelUpdateHead],
        rpn_criterion: SetCriterion,
        criterion: SetCriterion,
        in_features: list[str],
        num_thing_classes: int,
        num_stuff_classes: int,
        panoptic: bool,
        pixel_mean: list[float],
        pixel_std: list[float],
        size_divisibility: int | tuple[int, int] = 32,
        mask_upsample_stride: int = 2,
        mask_assign_stride: int = 4,
        max_per_image: int = 100,
        mask_thr: float = 0.5,
        instance_score_thr: float = 0.3,
        overlap_thr: float = 0.6,
    ):
        """
        Args:
            backbone: returns the maps named ``in_features`` (res2..res5).
            neck: FPN over those maps (P2..P5).
            kernel_head: stage 0 (semantic-FPN neck, initial kernels and masks).
            kernel_update_heads: the S update stages.
            rpn_criterion: losses of stage 0 (mask, dice, semantic, rank), own matching.
            criterion: losses of stages 1..S; stage s matched on stage s-1's predictions.
            in_features: backbone outputs read by the kernel head, finest first.
            num_thing_classes, num_stuff_classes: T and S (S used in panoptic mode only).
            panoptic: append one stuff kernel per stuff class and output ``panoptic_seg``.
            pixel_mean, pixel_std: input normalization (RGB ImageNet for the official models).
            size_divisibility: pad inputs to a multiple of this (32), or (training, test)
                multiples (``common.modeling.meta_arch.padding_multiples``).
            mask_upsample_stride: upsampling of stage masks (stride 8 -> 4) for loss/inference.
            mask_assign_stride: targets are resized to padded size / this.
            max_per_image, mask_thr: instance inference (top-k, mask threshold).
            instance_score_thr, overlap_thr: panoptic merge thresholds.
        """
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.kernel_head = kernel_head
        self.kernel_update_heads = nn.ModuleList(kernel_update_heads)
        self.rpn_criterion = rpn_criterion
        self.criterion = criterion
        self.in_features = list(in_features)
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.panoptic = panoptic
        if isinstance(size_divisibility, int):
            size_divisibility = (size_divisibility, size_divisibility)
        self.size_divisibility = tuple(size_divisibility)
        self.mask_upsample_stride = mask_upsample_stride
        self.mask_assign_stride = mask_assign_stride
        self.max_per_image = max_per_image
        self.mask_thr = mask_thr
        self.instance_score_thr = instance_score_thr
        self.overlap_thr = overlap_thr
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        k = cfg.MODEL.KNET
        task = cfg.MODEL.TASK or "instance"
        if task not in ("instance", "panoptic"):
            raise ValueError(f"KNet: MODEL.TASK={task!r}: expected 'instance' or 'panoptic'")
        panoptic = task == "panoptic"
        n_classes = num_classes(cfg)
        num_things = k.NUM_THING_CLASSES if panoptic else n_classes
        num_stuff = n_classes - num_things
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in k.IN_FEATURES if f not in shapes]
        if missing:
            raise KeyError(
                f"MODEL.KNET.IN_FEATURES {missing} not in backbone outputs {sorted(shapes)}"
            )
        strides = [shapes[f].stride for f in k.IN_FEATURES]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"MODEL.KNET.IN_FEATURES must have doubling strides, got {strides}")
        if k.NECK == "FPN":  # K-Net's own (mmdet FPN)
            neck = FPNNeck(
                in_channels=[shapes[f].channels for f in k.IN_FEATURES], out_channels=k.HIDDEN_DIM
            )
            num_levels = len(k.IN_FEATURES)
        else:  # a registered pixel decoder (built from its MODEL.SEM_SEG_HEAD.* keys)
            neck = PixelDecoderNeck.build(
                cfg, k.NECK, {f: shapes[f] for f in k.IN_FEATURES}, "MODEL.KNET.NECK"
            )
            num_levels = len(neck.strides)
            _check_neck(cfg, neck.strides, neck.with_mask_features)
        kernel_head = ConvKernelHead(
            num_proposals=k.NUM_PROPOSALS,
            num_classes=n_classes,
            num_levels=num_levels,
            in_channels=k.HIDDEN_DIM,
            channels=k.HIDDEN_DIM,
            conv_kernel_size=k.CONV_KERNEL_SIZE,
            neck_out_level=k.NECK_OUT_LEVEL,
            pos_encoding_level=k.POS_ENCODING_LEVEL,
            norm=k.NECK_NORM,
            kernel_init_std=k.KERNEL_INIT_STD,
        )
        heads = [
            KernelUpdateHead(
                num_classes=n_classes,
                in_channels=k.HIDDEN_DIM,
                conv_kernel_size=k.CONV_KERNEL_SIZE,
                num_heads=k.NUM_HEADS,
                feedforward_channels=k.FEEDFORWARD_DIM,
                num_cls_fcs=k.NUM_CLS_FCS,
                num_mask_fcs=k.NUM_MASK_FCS,
                dropout=k.DROPOUT,
                updator_channels=k.UPDATOR_DIM,
                hard_mask_thr=k.HARD_MASK_THR,
                adaptive_kernel_update=k.ADAPTIVE_KERNEL_UPDATE,
                kernel_interaction=k.KERNEL_INTERACTION,
            )
            for _ in range(k.NUM_STAGES)
        ]
        rpn_criterion, criterion = build_knet_criteria(cfg, n_classes, panoptic, num_things)
        return {
            "backbone": backbone,
            "neck": neck,
            "kernel_head": kernel_head,
            "kernel_update_heads": heads,
            "rpn_criterion": rpn_criterion,
            "criterion": criterion,
            "in_features": k.IN_FEATURES,
            "num_thing_classes": num_things,
            "num_stuff_classes": num_stuff,
            "panoptic": panoptic,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": padding_multiples(backbone, cfg),
            "mask_upsample_stride": k.MASK_UPSAMPLE_STRIDE,
            "mask_assign_stride": k.MASK_ASSIGN_STRIDE,
            "max_per_image": k.TEST.MAX_PER_IMAGE,
            "mask_thr": k.TEST.MASK_THR,
            "instance_score_thr": k.TEST.INSTANCE_SCORE_THR,
            "overlap_thr": k.TEST.OVERLAP_THR,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ---- forward ----------------------------------------------------------------------
    def forward(self, batched_inputs: list[dict[str, Any]]):
        """
        Args:
            batched_inputs: mapper outputs: ``image`` [3, H, W] (cfg.INPUT.FORMAT), optional
                ``height``/``width``; training: ``instances`` (gt_classes, gt_masks; panoptic
                also gt_is_thing).

        Returns:
            training: dict of weighted losses (``loss_<term>_s<stage>``, stage 0 = initial
            kernels); inference: per image ``{"instances": Instances}`` or
            ``{"panoptic_seg": (ids [H, W], segments_info)}``.
        """
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.core_postprocess(self.inference_core(images.tensor), batched_inputs, images)
        features = self.backbone(images.tensor)
        stage0 = self.kernel_head(self.neck([features[f] for f in self.in_features]))
        targets = self.prepare_targets(batched_inputs, images)
        rpn_outputs, outputs = self.forward_train_stages(stage0)
        losses = self.rpn_criterion(rpn_outputs, targets)
        losses.update(self.criterion(outputs, targets))
        return losses

    core_output_names = ("pred_logits", "pred_masks")

    def inference_core(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The traceable part of inference (what ``tools/export_model.py`` exports).

        Args:
            images: [B, 3, H_pad, W_pad] normalised, padded images.
            image_sizes: unused (the common core signature; see ``common.modeling.export``).
        Returns:
            ``pred_logits`` [B, Q, C] and stride-4 ``pred_masks`` [B, Q, h, w] of the last stage.
        """
        features = self.backbone(images)
        stage0 = self.kernel_head(self.neck([features[f] for f in self.in_features]))
        cls_logits, mask_logits = self.forward_test_stages(stage0)
        return {"pred_logits": cls_logits, "pred_masks": mask_logits}

    def core_postprocess(
        self, outputs: dict[str, Tensor], batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Any]]:
        """:meth:`inference` on :meth:`inference_core`'s outputs (from any runtime)."""
        return self.inference(outputs["pred_logits"], outputs["pred_masks"], batched_inputs, images)

    def _upsample(self, x: Tensor) -> Tensor:
        if self.mask_upsample_stride == 1:
            return x
        return F.interpolate(
            x, scale_factor=self.mask_upsample_stride, mode="bilinear", align_corners=False
        )

    def _initial(self, stage0: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.panoptic:
            return self.kernel_head.with_stuff_kernels(stage0, self.num_thing_classes)
        return stage0["kernels"], stage0["mask_logits"]

    def forward_train_stages(self, stage0: dict[str, Tensor]) -> tuple[dict, dict]:
        """Run all stages, keeping every stage's stride-4 predictions for the criteria.

        Returns:
            (stage-0 dict ``pred_masks`` [B, N, h, w] + ``pred_seg`` [B, C, h, w],
            stage dict of the last stage ``pred_logits`` [B, Q, C] + ``pred_masks``
            [B, Q, h, w] with ``aux_outputs`` for stages 1..S-1); stage 1 carries
            ``match_outputs`` = the stage-0 dict (K-Net matches stage s on stage s-1).
        """
        rpn = {
            "pred_masks": self._upsample(stage0["mask_logits"]),
            "pred_seg": self._upsample(stage0["seg_logits"]),
        }
        kernels, masks = self._initial(stage0)
        stages = []
        for head in self.kernel_update_heads:
            cls_logits, masks, kernels = head(stage0["x_feats"], kernels, masks)
            stages.append({"pred_logits": cls_logits, "pred_masks": self._upsample(masks)})
        stages[0]["match_outputs"] = rpn
        return rpn, {**stages[-1], "aux_outputs": stages[:-1]}

    def forward_test_stages(self, stage0: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Returns the last stage's cls logits [B, Q, C] and stride-4 mask logits [B, Q, h, w]."""
        kernels, masks = self._initial(stage0)
        cls_logits = None
        for head in self.kernel_update_heads:
            cls_logits, masks, kernels = head(stage0["x_feats"], kernels, masks)
        return cls_logits, self._upsample(masks)

    # ---- data ---------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        """Normalize and pad to ``size_divisibility``: ImageList [B, 3, H_pad, W_pad]."""
        div = self.size_divisibility[0 if self.training else 1]
        return normalize_and_pad(batched_inputs, self.pixel_mean, self.pixel_std, div, "K-Net")

    def prepare_targets(
        self, batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict]:
        """Per image ``labels`` [G] (things, then one target per present stuff class) and
        ``masks`` [G, H_pad / 4, W_pad / 4] (zero-padded, bilinearly resized, soft)."""
        pad_h, pad_w = images.tensor.shape[-2:]
        size = (pad_h // self.mask_assign_stride, pad_w // self.mask_assign_stride)
        targets = []
        for x, image_size in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            masks = inst.gt_masks.tensor if hasattr(inst.gt_masks, "tensor") else inst.gt_masks
            labels = inst.gt_classes
            if self.panoptic:
                if not inst.has("gt_is_thing"):
                    raise KeyError("panoptic K-Net needs instances.gt_is_thing (mapper 'panoptic')")
                labels, masks = _merge_stuff(labels, masks, inst.gt_is_thing)
            _check_labels(labels, self.num_thing_classes, self.num_stuff_classes, self.panoptic)
            masks = F.pad(masks.float(), (0, pad_w - masks.shape[-1], 0, pad_h - masks.shape[-2]))
            if masks.shape[0]:
                masks = F.interpolate(masks[None], size, mode="bilinear", align_corners=False)[0]
            else:
                masks = masks.new_zeros((0, *size))
            targets.append({"labels": labels, "masks": masks, "image_size": tuple(image_size)})
        return targets

    # ---- inference ------------------------------------------------------------------------
    def inference(
        self,
        cls_logits: Tensor,
        mask_logits: Tensor,
        batched_inputs: list[dict[str, Any]],
        images: ImageList,
    ) -> list[dict[str, Any]]:
        padded = tuple(images.tensor.shape[-2:])
        results = []
        for i, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            out_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
            common = {
                "padded_size": padded,
                "image_size": tuple(image_size),
                "output_size": out_size,
            }
            if self.panoptic:
                pan = panoptic_inference(
                    cls_logits[i],
                    mask_logits[i],
                    num_proposals=self.kernel_head.num_proposals,
                    num_thing_classes=self.num_thing_classes,
                    instance_score_thr=self.instance_score_thr,
                    overlap_thr=self.overlap_thr,
                    mask_thr=self.mask_thr,
                    **common,
                )
                results.append({"panoptic_seg": pan})
            else:
                inst = instance_inference(
                    cls_logits[i],
                    mask_logits[i],
                    max_per_image=self.max_per_image,
                    mask_thr=self.mask_thr,
                    **common,
                )
                results.append({"instances": inst})
        return results


def _check_neck(cfg: CfgNode, strides: list[int], with_mask_features: bool) -> None:
    """A pixel decoder as K-Net's neck (MODEL.KNET.NECK): its width must be HIDDEN_DIM, the
    levels NECK_OUT_LEVEL / POS_ENCODING_LEVEL must exist, and the first at the stride whose
    masks, upsampled by MASK_UPSAMPLE_STRIDE, meet the targets at MASK_ASSIGN_STRIDE."""
    k, head = cfg.MODEL.KNET, cfg.MODEL.SEM_SEG_HEAD
    widths = {"MODEL.SEM_SEG_HEAD.CONVS_DIM": head.CONVS_DIM}
    if with_mask_features:
        widths["MODEL.SEM_SEG_HEAD.MASK_DIM"] = head.MASK_DIM
    for key, width in widths.items():
        if width != k.HIDDEN_DIM:
            raise ValueError(
                f"MODEL.KNET.NECK={k.NECK!r}: {key}={width} must equal "
                f"MODEL.KNET.HIDDEN_DIM={k.HIDDEN_DIM}"
            )
    for level, key in ((k.NECK_OUT_LEVEL, "NECK_OUT_LEVEL"),
                       (k.POS_ENCODING_LEVEL, "POS_ENCODING_LEVEL")):  # fmt: skip
        if level >= len(strides):
            raise ValueError(
                f"MODEL.KNET.{key}={level} but MODEL.KNET.NECK={k.NECK!r} gives "
                f"{len(strides)} levels (strides {strides})"
            )
    want = k.MASK_ASSIGN_STRIDE * k.MASK_UPSAMPLE_STRIDE
    if strides[k.NECK_OUT_LEVEL] != want:
        raise ValueError(
            f"MODEL.KNET.NECK={k.NECK!r}: level NECK_OUT_LEVEL={k.NECK_OUT_LEVEL} has stride "
            f"{strides[k.NECK_OUT_LEVEL]}, K-Net needs {want} (MASK_ASSIGN_STRIDE x "
            f"MASK_UPSAMPLE_STRIDE); its levels have strides {strides}"
        )


def build_knet_criteria(
    cfg: CfgNode, num_classes: int, panoptic: bool, num_thing_classes: int | None = None
) -> tuple[SetCriterion, SetCriterion]:
    """The shared matcher/criterion configured as K-Net (spec A4).

    Returns:
        (stage-0 criterion: mask/dice/seg[/rank], matched on its own masks without a class cost;
        stages 1..S criterion: cls/mask/dice[/rank], stage s matched on stage s-1 - stage 1 on
        the stage-0 masks without a class cost).
    """
    k = cfg.MODEL.KNET
    n = k.NUM_PROPOSALS
    t = num_classes if num_thing_classes is None else num_thing_classes
    focal = {"alpha": k.FOCAL_ALPHA, "gamma": k.FOCAL_GAMMA}
    if cfg.MODEL.MATCHER.COSTS:
        costs = costs_from_config(
            cfg, (), {"focal_class": focal}, ("pred_logits", "pred_masks"), "K-Net"
        )
    else:  # K-Net's own terms (mmdet FocalLossCost, DiceCost, MaskCost)
        costs = [
            ("focal_class", k.COST_CLASS, focal),
            ("dice_sq", k.COST_DICE, {}),
            ("mask_agreement", k.COST_MASK, {}),
        ]
    # the stage-0 matcher (and stage 1, matched on the stage-0 masks) has no class scores
    mask_costs = [c for c in costs if "pred_logits" not in COST_TERMS[c[0]].required_keys]

    def matcher(with_class: bool, with_stuff: bool) -> KNetMatcher:
        return KNetMatcher(
            HungarianMatcher(costs if with_class else mask_costs),
            num_proposals=n,
            num_thing_classes=t,
            with_stuff=with_stuff,
        )

    rank = [("rank", {"ignore_index": 255})] if panoptic else []
    weights = {
        "loss_cls": k.CLASS_WEIGHT,
        "loss_mask": k.MASK_WEIGHT,
        "loss_dice": k.DICE_WEIGHT,
        "loss_seg": k.SEG_WEIGHT,
    }
    if panoptic:
        weights["loss_rank"] = k.RANK_WEIGHT
    mask_terms = ["mask_bce", ("mask_dice", {"form": "squared", "eps": 1e-3})]
    rpn_terms = [*mask_terms, ("knet_semantic_seg", {"num_thing_classes": t, **focal}), *rank]
    rpn_criterion = SetCriterion(
        matcher(False, False),
        num_classes,
        rpn_terms,
        {key: w for key, w in weights.items() if key != "loss_cls"},
        normalizer="num_matched",
        key_style="stage",
        stage_offset=0,
    )
    num_stages = k.NUM_STAGES
    if len(k.STAGE_LOSS_WEIGHTS) != num_stages:
        raise ValueError(
            f"MODEL.KNET.STAGE_LOSS_WEIGHTS has {len(k.STAGE_LOSS_WEIGHTS)} entries for "
            f"NUM_STAGES={num_stages}"
        )
    cls_term = ("knet_labels_focal", {"num_proposals": n, "num_thing_classes": t, **focal})
    criterion = SetCriterion(
        matcher(True, panoptic),
        num_classes,
        [cls_term, *mask_terms, *rank],
        {key: w for key, w in weights.items() if key != "loss_seg"},
        normalizer="num_matched",
        key_style="stage",
        stage_offset=1,
        stage_loss_weights=k.STAGE_LOSS_WEIGHTS,
        match_previous_stage=True,
        stage_matchers=[matcher(False, panoptic)] + [None] * (num_stages - 1),
    )
    return rpn_criterion, criterion


def _merge_stuff(labels: Tensor, masks: Tensor, is_thing: Tensor) -> tuple[Tensor, Tensor]:
    """Things first (as given), then one union mask per stuff class present.

    Returns:
        labels [G'] and masks [G', H, W] (bool).
    """
    stuff_labels = labels[~is_thing]
    classes = torch.unique(stuff_labels)
    stuff_masks = [masks[~is_thing][stuff_labels == c].any(dim=0) for c in classes]
    out_masks = masks[is_thing]
    if stuff_masks:
        out_masks = torch.cat([out_masks, torch.stack(stuff_masks)])
    return torch.cat([labels[is_thing], classes]), out_masks


def _check_labels(labels: Tensor, num_things: int, num_stuff: int, panoptic: bool) -> None:
    if labels.numel() == 0:
        return
    if int(labels.min()) < 0 or int(labels.max()) >= num_things + num_stuff:
        what = f"{num_things} thing + {num_stuff} stuff" if panoptic else f"{num_things}"
        raise ValueError(
            f"ground-truth class ids span [{int(labels.min())}, {int(labels.max())}] but the "
            f"model predicts {what} classes (MODEL.NUM_CLASSES)"
        )
