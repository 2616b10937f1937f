"""K-Net meta-architecture for semantic segmentation (the ADE20K model zoo variant)."""

from __future__ import annotations

from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn
from torch.nn import functional as F

from common.modeling.losses import softmax_ce_loss
from common.modeling.meta_arch import normalize_and_pad, num_classes, padding_multiples

from .decode_heads import FCNHead, _KernelDecodeHead, build_decode_head
from .kernel_update_head import KernelUpdateHead


@META_ARCH_REGISTRY.register()
class KNetSemantic(nn.Module):
    """K-Net (NeurIPS 2021) on a base decode head (``IterativeDecodeHead`` of ZwwWayne/K-Net and
    mmseg): one kernel per class taken from the decode head's classifier, refined by S kernel
    update heads with soft mask assembling and no classification branch; CE on every stage
    plus an auxiliary FCN head. Kernels wider than MODEL.KNET.UPDATOR_DIM are updated in chunks
    as the official code does. Differs only in Detectron2 layer names and padding (README).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        decode_head: _KernelDecodeHead,
        kernel_update_heads: list[KernelUpdateHead],
        aux_head: FCNHead | None,
        in_features: list[str],
        aux_in_feature: str,
        num_classes: int,
        ignore_value: int,
        loss_weight: float,
        aux_weight: float,
        pixel_mean: list[float],
        pixel_std: list[float],
        size_divisibility: int,
        test_size_divisibility: int = 32,
    ):
        """
        Args:
            backbone: returns ``in_features`` (and ``aux_in_feature``).
            decode_head: FCN/PSP/ASPP/UPerNet head giving the stage-0 logits, the features and
                the class kernels.
            kernel_update_heads: S heads (soft assembling, ``with_cls=False``).
            aux_head: auxiliary FCN head on ``aux_in_feature`` (None: no auxiliary loss).
            num_classes: classes of the dataset (ADE20K 150).
            ignore_value: label of ignored pixels (also the padding label).
            loss_weight: CE weight of every stage; aux_weight: CE weight of the aux head.
            pixel_mean, pixel_std: input normalization.
            size_divisibility: pad training inputs (and labels, with ``ignore_value``) to a
                multiple (the crop size, as mmseg's Pad).
            test_size_divisibility: pad test inputs only to a multiple of this (mmseg does not
                pad at test time; 32 keeps every backbone stride exact).
        """
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.kernel_update_heads = nn.ModuleList(kernel_update_heads)
        self.aux_head = aux_head
        self.in_features = list(in_features)
        self.aux_in_feature = aux_in_feature
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.aux_weight = aux_weight
        self.size_divisibility = size_divisibility
        self.test_size_divisibility = test_size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        k, s = cfg.MODEL.KNET, cfg.MODEL.KNET.SEMANTIC
        n_classes = num_classes(cfg)
        backbone = build_backbone(cfg)
        train_div, test_div = padding_multiples(backbone, cfg)
        shapes = backbone.output_shape()
        wanted = [*s.IN_FEATURES, *([s.AUX_IN_FEATURE] if s.AUX_IN_FEATURE else [])]
        missing = [f for f in wanted if f not in shapes]
        if missing:
            raise KeyError(f"features {missing} not in backbone outputs {sorted(shapes)}")
        decode_head = build_decode_head(
            s.DECODE_HEAD,
            in_channels=[shapes[f].channels for f in s.IN_FEATURES],
            channels=s.CHANNELS,
            num_classes=n_classes,
            norm=s.NORM,
            dropout=s.DROPOUT,
            fcn_num_convs=s.FCN_NUM_CONVS,
            fcn_concat_input=s.FCN_CONCAT_INPUT,
            pool_scales=s.POOL_SCALES,
            aspp_dilations=s.ASPP_DILATIONS,
        )
        heads = [
            KernelUpdateHead(
                num_classes=n_classes,
                in_channels=s.CHANNELS,
                conv_kernel_size=k.CONV_KERNEL_SIZE,
                num_heads=k.NUM_HEADS,
                feedforward_channels=k.FEEDFORWARD_DIM,
                num_mask_fcs=k.NUM_MASK_FCS,
                dropout=k.DROPOUT,
                updator_channels=k.UPDATOR_DIM,
                hard_mask_thr=None,
                with_cls=False,
                reference_init="mmseg",
                adaptive_kernel_update=k.ADAPTIVE_KERNEL_UPDATE,
                kernel_interaction=k.KERNEL_INTERACTION,
            )
            for _ in range(k.NUM_STAGES)
        ]
        aux_head = None
        if s.AUX_IN_FEATURE:
            aux_head = FCNHead(
                in_channels=shapes[s.AUX_IN_FEATURE].channels,
                channels=s.AUX_CHANNELS,
                num_classes=n_classes,
                num_convs=1,
                concat_input=False,
                norm=s.NORM,
                dropout=s.DROPOUT,
            )
        return {
            "backbone": backbone,
            "decode_head": decode_head,
            "kernel_update_heads": heads,
            "aux_head": aux_head,
            "in_features": s.IN_FEATURES,
            "aux_in_feature": s.AUX_IN_FEATURE,
            "num_classes": n_classes,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss_weight": s.LOSS_WEIGHT,
            "aux_weight": s.AUX_WEIGHT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": train_div,
            "test_size_divisibility": test_div,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: list[dict[str, Any]]):
        """
        Args:
            batched_inputs: mapper outputs with ``image`` [3, H, W], optional ``height``/
                ``width`` and, in training, ``sem_seg`` [H, W] long.

        Returns:
            training: ``loss_ce_s0`` (decode head) .. ``loss_ce_s<S>`` and ``loss_ce_aux``;
            inference: per image ``{"sem_seg": [num_classes, height, width] probabilities}``.
        """
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.core_postprocess(self.inference_core(images.tensor), batched_inputs, images)
        features = self.backbone(images.tensor)
        stage_logits = self.forward_stages([features[f] for f in self.in_features])
        if any("sem_seg" not in x for x in batched_inputs):
            raise KeyError("KNetSemantic needs 'sem_seg' in every training input")
        labels = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.size_divisibility,
            pad_value=self.ignore_value,
        ).tensor
        losses = {
            f"loss_ce_s{i}": self.loss_weight * self.ce_loss(logits, labels)
            for i, logits in enumerate(stage_logits)
        }
        if self.aux_head is not None:
            aux_logits = self.aux_head([features[self.aux_in_feature]])[0]
            losses["loss_ce_aux"] = self.aux_weight * self.ce_loss(aux_logits, labels)
        return losses

    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        """Normalize and pad (training: ``size_divisibility``, test: ``test_size_divisibility``).

        Returns:
            ImageList [B, 3, H_pad, W_pad].
        """
        div = self.size_divisibility if self.training else self.test_size_divisibility
        return normalize_and_pad(batched_inputs, self.pixel_mean, self.pixel_std, div, "K-Net")

    core_output_names = ("sem_seg_logits",)

    def inference_core(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The traceable part of inference (what ``tools/export_model.py`` exports).

        Args:
            images: [B, 3, H_pad, W_pad] normalised, padded images.
            image_sizes: unused (the common core signature; see ``common.modeling.export``).
        Returns:
            ``sem_seg_logits`` [B, num_classes, h, w] of the last stage.
        """
        features = self.backbone(images)
        stage_logits = self.forward_stages([features[f] for f in self.in_features])
        return {"sem_seg_logits": stage_logits[-1]}

    def core_postprocess(
        self, outputs: dict[str, Tensor], batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Tensor]]:
        """:meth:`inference` on :meth:`inference_core`'s outputs (from any runtime)."""
        return self.inference(outputs["sem_seg_logits"], batched_inputs, images)

    def forward_stages(self, features: list[Tensor]) -> list[Tensor]:
        """Returns the logits of every stage, [B, num_classes, h, w] each (stage 0 first)."""
        logits, feats, kernels = self.decode_head(features)
        stage_logits = [logits]
        for head in self.kernel_update_heads:
            _, logits, kernels = head(feats, kernels, logits)
            stage_logits.append(logits)
        return stage_logits

    def ce_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """mmseg ``CrossEntropyLoss``: logits resized bilinearly to the labels, per-pixel CE,
        summed over valid pixels and divided by ALL pixels (``avg_non_ignore=False``)."""
        logits = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
        if logits.dtype != torch.float64:  # half precision (AMP) -> float32; float64 kept
            logits = logits.float()
        return softmax_ce_loss(
            logits.permute(0, 2, 3, 1),
            labels,
            ignore_index=self.ignore_value,
            avg_factor=float(max(labels.numel(), 1)),
        )

    def inference(
        self, logits: Tensor, batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Tensor]]:
        logits = F.interpolate(
            logits, images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        results = []
        for x, image_size, logit in zip(batched_inputs, images.image_sizes, logits):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            r = sem_seg_postprocess(logit, image_size, height, width)
            results.append({"sem_seg": r.softmax(dim=0)})
        return results
