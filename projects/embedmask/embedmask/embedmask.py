"""EmbedMask meta-architecture (Ying et al., arXiv 1912.01954 / IJCAI-21).

Provenance: EmbedMask v2 (yinghdb/EmbedMask e9d6142) on FCOS, as a Detectron2 meta-arch laid out
like the author's AdelaiDet port (``backbone``, ``proposal_generator.fcos_head``). Differences:
plain-PyTorch mask probabilities (no CUDA op); masks are resized to the output size in the
model (v2: in the COCO evaluator), by default as v2's evaluator does (``MASK_RESIZE padded``).
"""

from __future__ import annotations

import math

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn
from torch.nn import functional as F

from common.modeling.meta_arch import (
    backbone_size_divisibility,
    normalize_and_pad,
    padding_multiples,
)

from .embed_head import EmbedMaskHead, mask_log_probability
from .fcos import FCOS
from .mask_loss import EmbedMaskLoss

#: log-probability written outside the detected box (v2's CUDA op), and the box padding (px at
#: the pixel-embedding stride) of that crop.
_OUTSIDE_BOX_LOG_PROB = -10.0
_BOX_CROP_PAD = 2
MASK_RESIZES = ("padded", "exact")


@META_ARCH_REGISTRY.register()
class EmbedMask(nn.Module):
    """FCOS detector + pixel/proposal embeddings; mask probability
    p_ik = exp(-sum_d m_kd (e_id - q_kd)^2) of pixel i for proposal k; NMS-based inference."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: FCOS,
        embed_head: EmbedMaskHead,
        mask_loss: EmbedMaskLoss,
        in_features: list[str],
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        mask_threshold: float = 0.53,
        mask_box_crop: bool = True,
        mask_resize: str = "padded",
        size_divisibility: tuple[int, int] | None = None,
    ):
        """
        Args:
            backbone: FPN backbone giving ``in_features`` (P3..P7).
            proposal_generator: the FCOS detector.
            embed_head: pixel and proposal embedding heads.
            mask_loss: the mask (and smooth) loss.
            in_features: FPN levels for FCOS, finest first; the first one feeds the pixel head.
            pixel_mean, pixel_std: per-channel input normalisation.
            mask_threshold: a pixel is foreground where p > mask_threshold.
            mask_box_crop: compute masks only inside the detected box (+2 px at stride 4).
            mask_resize: "padded" (v2's COCO evaluator: resize the padded stride-4 grid by
                out / in, then crop) or "exact" (sample each output pixel's exact position).
            size_divisibility: (training, test) padding multiples; None: the backbone's.
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.embed_head = embed_head
        self.mask_loss = mask_loss
        self.in_features = list(in_features)
        self.mask_log_threshold = math.log(mask_threshold)
        self.mask_box_crop = mask_box_crop
        if mask_resize not in MASK_RESIZES:
            raise ValueError(
                f"MODEL.EMBEDMASK.MASK_RESIZE must be one of {MASK_RESIZES}, got {mask_resize!r}"
            )
        self.mask_resize = mask_resize
        if size_divisibility is None:
            size_divisibility = (backbone_size_divisibility(backbone),) * 2
        self.size_divisibility = tuple(size_divisibility)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        shapes = backbone.output_shape()
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ValueError(f"backbone lacks MODEL.FCOS.IN_FEATURES {missing}; has {list(shapes)}")
        strides = [shapes[f].stride for f in self.in_features]
        if strides != proposal_generator.strides:
            raise ValueError(f"MODEL.FCOS.FPN_STRIDES {proposal_generator.strides} != {strides}")
        self.pixel_stride = strides[0]

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        backbone = build_backbone(cfg)
        in_channels = backbone.output_shape()[cfg.MODEL.FCOS.IN_FEATURES[0]].channels
        e = cfg.MODEL.EMBEDMASK
        return {
            "backbone": backbone,
            "proposal_generator": FCOS(cfg, in_channels),
            "embed_head": EmbedMaskHead(cfg, in_channels),
            "mask_loss": EmbedMaskLoss(
                positive_sampling=e.POSITIVE_SAMPLING,
                sample_pos_iou_th=e.SAMPLE_POS_IOU_TH,
                max_proposals=e.MAX_PROPOSALS,
                box_padding=e.BOX_PADDING,
                loss_mask_alpha=e.LOSS_MASK_ALPHA,
                loss_smooth_alpha=e.LOSS_SMOOTH_ALPHA,
                inclusive_boxes=cfg.MODEL.FCOS.BOX_CONVENTION == "maskrcnn-benchmark",
            ),
            "in_features": cfg.MODEL.FCOS.IN_FEATURES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "mask_threshold": e.MASK_TH,
            "mask_box_crop": e.MASK_BOX_CROP,
            "mask_resize": e.MASK_RESIZE,
            "size_divisibility": padding_multiples(backbone, cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def mask_stride(self) -> int:
        """Stride of the pixel embeddings (P3 stride / MASK_SCALE_FACTOR; 4 by default)."""
        return self.pixel_stride // self.embed_head.mask_scale_factor

    def forward(self, batched_inputs: list[dict]) -> dict[str, Tensor] | list[dict]:
        """
        Args:
            batched_inputs: mapper dicts with "image" [3, H, W] and, in training, "instances"
                (gt_classes, gt_boxes, gt_masks BitMasks); "height"/"width" optional.

        Returns:
            training: {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"} (+
            "loss_smooth"); inference: per image {"instances": Instances(pred_boxes, scores,
            pred_classes, pred_masks [n, height, width] bool)}.
        """
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.core_postprocess(self.inference_core(images.tensor), batched_inputs, images)
        features = self.backbone(images.tensor)
        fcos_outputs = self.proposal_generator([features[f] for f in self.in_features])
        pixel_embed = self.embed_head.pixel_embedding(
            features[self.in_features[0]], self.pixel_stride
        )
        proposal_embed, margin = self.embed_head.proposal_embedding(
            fcos_outputs["bbox_towers"], self.proposal_generator.strides
        )
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        targets = self.proposal_generator.get_targets(fcos_outputs, gt_instances)
        losses = self.proposal_generator.losses(fcos_outputs, targets)
        losses.update(
            self.mask_loss(
                pixel_embed,
                proposal_embed,
                margin,
                fcos_outputs,
                targets,
                gt_instances,
                self.mask_stride,
            )
        )
        return losses

    core_output_names = ("logits", "bbox_reg", "ctrness", "top_feats", "pixel_embed", "level_sizes")

    def inference_core(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The traceable part of inference (what ``tools/export_model.py`` exports): the dense
        FCOS and embedding outputs; thresholds, NMS and the masks run in :meth:`core_postprocess`.

        Args:
            images: [B, 3, H_pad, W_pad] normalised, padded images.
            image_sizes: unused (the common core signature; see ``common.modeling.export``).
        Returns:
            ``logits`` [B, L, C], ``bbox_reg`` [B, L, 4], ``ctrness`` [B, L], ``top_feats``
            [B, L, 2D] (proposal embedding and margin), ``pixel_embed`` [B, D, H', W'] and
            ``level_sizes`` [levels, 2] long (the FCOS level sizes; constant in a trace).
        """
        features = self.backbone(images)
        fcos_outputs = self.proposal_generator([features[f] for f in self.in_features])
        pixel_embed = self.embed_head.pixel_embedding(
            features[self.in_features[0]], self.pixel_stride
        )
        proposal_embed, margin = self.embed_head.proposal_embedding(
            fcos_outputs["bbox_towers"], self.proposal_generator.strides
        )
        return {
            "logits": fcos_outputs["logits"],
            "bbox_reg": fcos_outputs["bbox_reg"],
            "ctrness": fcos_outputs["ctrness"],
            "top_feats": torch.cat([proposal_embed, margin], dim=2),
            "pixel_embed": pixel_embed,
            "level_sizes": torch.tensor(fcos_outputs["level_sizes"], device=images.device),
        }

    def core_postprocess(
        self, outputs: dict[str, Tensor], batched_inputs: list[dict], images: ImageList
    ) -> list[dict]:
        """FCOS detections and :meth:`inference` on :meth:`inference_core`'s outputs (from any
        runtime)."""
        sizes = [tuple(int(v) for v in hw) for hw in outputs["level_sizes"].tolist()]
        fcos_outputs = {
            "logits": outputs["logits"],
            "bbox_reg": outputs["bbox_reg"],
            "ctrness": outputs["ctrness"],
            **self.proposal_generator.location_layout(sizes, outputs["logits"].device),
        }
        detections = self.proposal_generator.predict_instances(
            fcos_outputs, images.image_sizes, outputs["top_feats"]
        )
        return self.inference(
            detections, outputs["pixel_embed"], batched_inputs, images.image_sizes
        )

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalise and pad (``common.modeling.meta_arch.padding_multiples``): [B, 3, H, W]."""
        div = self.size_divisibility[0 if self.training else 1]
        return normalize_and_pad(batched_inputs, self.pixel_mean, self.pixel_std, div, "EmbedMask")

    def inference(
        self,
        detections: list[Instances],
        pixel_embed: Tensor,
        batched_inputs: list[dict],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict]:
        """Masks from the embedding coupling, then boxes and masks at the requested output size.

        Args:
            detections: per image FCOS detections with ``top_feat`` [n, 2D] (embedding, margin).
            pixel_embed: [B, D, H', W'] pixel embeddings at stride ``mask_stride``.

        Returns:
            per image {"instances": Instances at (height, width)}.
        """
        dim = self.embed_head.embed_dim
        results = []
        for i, (det, size) in enumerate(zip(detections, image_sizes)):
            out_h = batched_inputs[i].get("height", size[0])
            out_w = batched_inputs[i].get("width", size[1])
            e = pixel_embed[i].flatten(1).t()
            log_prob = mask_log_probability(e, det.top_feat[:, :dim], det.top_feat[:, dim:])
            log_prob = log_prob.view(-1, *pixel_embed.shape[-2:])
            if self.mask_box_crop:
                log_prob = self._crop_to_boxes(log_prob, det.pred_boxes.tensor)
            results.append({"instances": self._postprocess(det, log_prob, size, (out_h, out_w))})
        return results

    def _crop_to_boxes(self, log_prob: Tensor, boxes: Tensor) -> Tensor:
        """Keep [n, H', W'] log-probabilities in each box's cells [x0, x1) x [y0, y1) with
        x0 = max(int(x1_box / s) - 2, 0), x1 = min(int(x2_box / s) + 2, W') (s the mask stride,
        boxes >= 0 in input pixels); elsewhere -10 (v2's box-restricted CUDA op)."""
        s = self.mask_stride
        grid = (boxes / s).long()
        h, w = log_prob.shape[-2:]
        x0 = (grid[:, 0] - _BOX_CROP_PAD).clamp(min=0)
        y0 = (grid[:, 1] - _BOX_CROP_PAD).clamp(min=0)
        x1 = (grid[:, 2] + _BOX_CROP_PAD).clamp(max=w)
        y1 = (grid[:, 3] + _BOX_CROP_PAD).clamp(max=h)
        ys = torch.arange(h, device=log_prob.device)
        xs = torch.arange(w, device=log_prob.device)
        in_y = (ys[None] >= y0[:, None]) & (ys[None] < y1[:, None])
        in_x = (xs[None] >= x0[:, None]) & (xs[None] < x1[:, None])
        inside = in_y[:, :, None] & in_x[:, None, :]
        return torch.where(inside, log_prob, torch.full_like(log_prob, _OUTSIDE_BOX_LOG_PROB))

    def _postprocess(
        self,
        det: Instances,
        log_prob: Tensor,
        image_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Instances:
        """Resize boxes and [n, H', W'] log-probability maps of the padded input to the output
        size (``mask_resize``), threshold at log(MASK_TH). Inclusive (maskrcnn-benchmark) boxes
        are scaled, then x2, y2 + 1 (its COCO export's w = x2 - x1 + 1), not clipped."""
        (img_h, img_w), (out_h, out_w) = image_size, output_size
        if not log_prob.shape[0]:
            resized = log_prob.new_zeros((0, out_h, out_w))
        elif self.mask_resize == "padded":
            resized = self._resize_padded(log_prob, image_size, output_size)
        else:
            resized = self._resize_exact(log_prob, image_size, output_size)
        result = Instances((out_h, out_w))
        boxes = det.pred_boxes.clone()
        boxes.scale(out_w / img_w, out_h / img_h)
        if self.proposal_generator.inclusive_boxes:
            boxes.tensor[:, 2:] += 1
        else:
            boxes.clip((out_h, out_w))
        result.pred_boxes = boxes
        result.scores = det.scores
        result.pred_classes = det.pred_classes
        result.pred_masks = resized > self.mask_log_threshold
        return result

    def _resize_padded(
        self, log_prob: Tensor, image_size: tuple[int, int], output_size: tuple[int, int]
    ) -> Tensor:
        """v2's COCO evaluator: the whole padded grid [n, H', W'] bilinearly (align_corners
        False) to ceil(H' * s * out_h / img_h) x ceil(W' * s * out_w / img_w) (float32, as v2),
        then the top-left [out_h, out_w]."""
        (img_h, img_w), (out_h, out_w) = image_size, output_size
        stride = torch.tensor(float(self.mask_stride))
        size = [
            int(torch.ceil(grid * stride * out / inp))
            for grid, out, inp in zip(log_prob.shape[-2:], (out_h, out_w), (img_h, img_w))
        ]
        resized = F.interpolate(log_prob[None], size=size, mode="bilinear", align_corners=False)
        return resized[0, :, :out_h, :out_w]

    def _resize_exact(
        self, log_prob: Tensor, image_size: tuple[int, int], output_size: tuple[int, int]
    ) -> Tensor:
        """One bilinear ``grid_sample`` at each output pixel centre's exact grid position."""
        (img_h, img_w), (out_h, out_w) = image_size, output_size
        s = self.mask_stride
        grid_h, grid_w = log_prob.shape[-2:]
        # output pixel centre -> input coordinate -> grid_sample coordinate (align_corners=False)
        ys = (torch.arange(out_h, device=log_prob.device) + 0.5) * (img_h / out_h) / s / grid_h
        xs = (torch.arange(out_w, device=log_prob.device) + 0.5) * (img_w / out_w) / s / grid_w
        gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None].to(log_prob.dtype)
        return F.grid_sample(
            log_prob[None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )[0]
