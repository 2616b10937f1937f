"""FCOS (Tian et al., ICCV 2019) as the one-stage detector under EmbedMask; reusable on its own.

Provenance: AdelaiDet's FCOS / FCOSOutputs and the maskrcnn-benchmark FCOS that EmbedMask v2 builds
on, with the same module names (``fcos_head.{cls_tower,bbox_tower,cls_logits,bbox_pred,ctrness,
scales}``). Differences: target assignment and inference are vectorised over locations x GTs;
``SAMPLE_IN_MASK`` (EmbedMask) is an option of the assignment. maskrcnn-benchmark's conventions
are the default and Detectron2's are options: ``BOX_CONVENTION`` (inclusive pixel boxes: GT
x2, y2 - 1, clip to size - 1, "+1" NMS widths, ties at the last kept score kept, x2, y2 + 1 on
output) and ``IOU_LOSS_SMOOTH`` (FCOS ``IOULoss``: (I + 1) / (U + 1); 0: ``common.modeling.losses``'
plain GIoU).
"""

from __future__ import annotations

import math

import torch
from detectron2.config import CfgNode, configurable
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms, nms

from common.modeling.losses import bce_with_logits_loss, giou_loss, sigmoid_focal_loss
from common.modeling.meta_arch import num_classes

INF = 1e8
#: "maskrcnn-benchmark": boxes are inclusive pixel indices (x2 = x + w - 1), as the official
#: EmbedMask/FCOS code trains and tests them; "detectron2": continuous coordinates (x2 = x + w).
BOX_CONVENTIONS = ("maskrcnn-benchmark", "detectron2")


class Scale(nn.Module):
    """A learnable scalar multiplier (FCOS per-level regression scale), init ``init_value``."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def compute_locations(h: int, w: int, stride: int, device: torch.device) -> Tensor:
    """Image coordinates of the feature-map cells of one level.

    Returns:
        [h*w, 2] float (x, y) = stride // 2 + stride * (j, i), row-major (x fastest), as FCOS.
    """
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def cat_levels(maps: list[Tensor]) -> Tensor:
    """Flatten per-level maps [B, C, H_l, W_l] into [B, sum_l H_l*W_l, C] (level-major)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def ltrb_to_boxes(locations: Tensor, ltrb: Tensor) -> Tensor:
    """Decode distances to the box sides into xyxy boxes.

    Args:
        locations: [..., 2] (x, y); ltrb: [..., 4] (l, t, r, b) in the same unit.

    Returns:
        [..., 4] xyxy.
    """
    x, y = locations[..., 0], locations[..., 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], -1)


def centerness_targets(ltrb: Tensor) -> Tensor:
    """FCOS centerness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)). ltrb: [N, 4] > 0 -> [N]."""
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    return ratio.clamp(min=0).sqrt()


def _reduce_mean(x: Tensor) -> Tensor:
    """Mean of a 0-d tensor over all processes (identity when not distributed)."""
    world = comm.get_world_size()
    if world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
        x = x / world
    return x


def fcos_iou_loss(pred: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """FCOS ``IOULoss("giou")``: 1 - GIoU of the boxes around one point, with the IoU smoothed
    as (I + smooth) / (U + smooth) (maskrcnn-benchmark FCOS: smooth 1, in stride units).

    Args:
        pred, target: [N, 4] non-negative (l, t, r, b).

    Returns:
        [N] losses.
    """
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    w_inter = torch.min(pred[:, 0], target[:, 0]) + torch.min(pred[:, 2], target[:, 2])
    h_inter = torch.min(pred[:, 1], target[:, 1]) + torch.min(pred[:, 3], target[:, 3])
    w_encl = torch.max(pred[:, 0], target[:, 0]) + torch.max(pred[:, 2], target[:, 2])
    h_encl = torch.max(pred[:, 1], target[:, 1]) + torch.max(pred[:, 3], target[:, 3])
    enclosing = w_encl * h_encl + 1e-7
    inter = w_inter * h_inter
    union = target_area + pred_area - inter
    iou = (inter + smooth) / (union + smooth)
    return 1 - (iou - (enclosing - union) / enclosing)


def class_wise_nms(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_th: float, plus_one: bool = False
) -> Tensor:
    """NMS within each class, one class at a time (exact in any dtype).

    Args:
        boxes: [N, 4] xyxy; scores: [N]; classes: [N] long.
        plus_one: maskrcnn-benchmark widths x2 - x1 + 1 (inclusive pixel boxes).

    Returns:
        [K] long indices of the kept boxes, by decreasing score.
    """
    if plus_one:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for c in torch.unique(classes):
        idx = torch.nonzero(classes == c).squeeze(1)
        kept[idx[nms(boxes[idx], scores[idx], iou_th)]] = True
    keep = torch.nonzero(kept).squeeze(1)
    return keep[scores[keep].argsort(descending=True, stable=True)]


class FCOSHead(nn.Module):
    """Shared FCOS head: cls tower -> cls_logits; box tower -> bbox_pred (x Scale, ReLU) and
    ctrness (centerness on the box tower, ``CENTERNESS_ON_REG``)."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        num_convs: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            in_channels: channels of every FPN level (256).
            num_classes: foreground classes C.
            num_levels: number of FPN levels (one learnable regression Scale each).
            num_convs: depth of each tower.
            norm: "GN" (GroupNorm with 32 groups) or "" (none).
            prior_prob: initial foreground probability of the classifier.
        """
        super().__init__()
        if norm not in ("GN", ""):
            raise ValueError(f"MODEL.FCOS.NORM must be 'GN' or '', got {norm!r}")
        self.num_classes = num_classes
        for name in ("cls_tower", "bbox_tower"):
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers.append(nn.Conv2d(in_channels, in_channels, 3, padding=1))
                if norm == "GN":
                    layers.append(nn.GroupNorm(32, in_channels))
                layers.append(nn.ReLU())
            self.add_module(name, nn.Sequential(*layers))
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int) -> dict:
        return {
            "in_channels": in_channels,
            "num_classes": num_classes(cfg),
            "num_levels": len(cfg.MODEL.FCOS.IN_FEATURES),
            "num_convs": cfg.MODEL.FCOS.NUM_CONVS,
            "norm": cfg.MODEL.FCOS.NORM,
            "prior_prob": cfg.MODEL.FCOS.PRIOR_PROB,
        }

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """
        Args:
            features: per level [B, C_in, H_l, W_l].

        Returns:
            dict of per-level lists: "logits" [B, C, H_l, W_l], "bbox_reg" [B, 4, H_l, W_l]
            (non-negative l, t, r, b in units of the level stride), "ctrness" [B, 1, H_l, W_l]
            logits, "bbox_towers" [B, C_in, H_l, W_l].
        """
        out: dict[str, list[Tensor]] = {
            "logits": [],
            "bbox_reg": [],
            "ctrness": [],
            "bbox_towers": [],
        }
        for level, feature in enumerate(features):
            cls_feat = self.cls_tower(feature)
            box_feat = self.bbox_tower(feature)
            out["logits"].append(self.cls_logits(cls_feat))
            out["bbox_reg"].append(F.relu(self.scales[level](self.bbox_pred(box_feat))))
            out["ctrness"].append(self.ctrness(box_feat))
            out["bbox_towers"].append(box_feat)
        return out


class FCOS(nn.Module):
    """FCOS proposal generator: head, target assignment, losses and NMS inference.

    The caller (a meta-arch) runs :meth:`forward` on the FPN levels, then :meth:`losses` with the
    GT instances, or :meth:`predict_instances`. Extra per-location features (EmbedMask's proposal
    embeddings) can ride along through inference as ``top_feats``.
    """

    @configurable
    def __init__(
        self,
        *,
        fcos_head: FCOSHead,
        strides: list[int],
        sizes_of_interest: list[float],
        center_sampling_radius: float = 1.5,
        sample_in_mask: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        inference_th: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_th: float = 0.6,
        post_nms_topk: int = 100,
        thresh_with_ctr: bool = False,
        box_convention: str = "maskrcnn-benchmark",
        iou_loss_smooth: float = 1.0,
    ):
        """
        Args:
            fcos_head: the shared head.
            strides: stride of each level, finest first.
            sizes_of_interest: L-1 boundaries of the per-level ranges of max(l, t, r, b).
            center_sampling_radius: radius in strides of the centre region (0: the whole box).
            sample_in_mask: a positive location must also lie inside the GT mask.
            focal_alpha, focal_gamma: sigmoid focal loss parameters.
            inference_th: score threshold; pre_nms_topk: candidates per level;
            nms_th: class-wise NMS IoU; post_nms_topk: detections kept per image.
            thresh_with_ctr: threshold cls * centerness instead of cls.
            box_convention: "maskrcnn-benchmark" (inclusive pixel boxes: GT x2, y2 - 1 for the
                targets; at inference clip to size - 1, "+1" NMS widths, ties with the last
                kept score kept, x2, y2 + 1 on the output boxes) or "detectron2".
            iou_loss_smooth: (I + s) / (U + s) in the GIoU regression loss (FCOS: 1, in stride
                units); 0 uses ``common.modeling.losses.giou_loss``.
        """
        super().__init__()
        if len(sizes_of_interest) != len(strides) - 1:
            raise ValueError(
                f"{len(strides)} FPN strides need {len(strides) - 1} SIZES_OF_INTEREST, "
                f"got {len(sizes_of_interest)}"
            )
        self.fcos_head = fcos_head
        self.num_classes = fcos_head.num_classes
        self.strides = list(strides)
        bounds = [-1.0, *[float(s) for s in sizes_of_interest], INF]
        self.size_ranges = list(zip(bounds[:-1], bounds[1:]))
        self.center_sampling_radius = center_sampling_radius
        self.sample_in_mask = sample_in_mask
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.inference_th, self.pre_nms_topk = inference_th, pre_nms_topk
        self.nms_th, self.post_nms_topk = nms_th, post_nms_topk
        self.thresh_with_ctr = thresh_with_ctr
        if box_convention not in BOX_CONVENTIONS:
            raise ValueError(
                f"MODEL.FCOS.BOX_CONVENTION must be one of {BOX_CONVENTIONS}, "
                f"got {box_convention!r}"
            )
        self.box_convention = box_convention
        self.iou_loss_smooth = iou_loss_smooth

    @property
    def inclusive_boxes(self) -> bool:
        """Whether boxes are maskrcnn-benchmark inclusive pixel boxes (``box_convention``)."""
        return self.box_convention == "maskrcnn-benchmark"

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int) -> dict:
        f = cfg.MODEL.FCOS
        if len(f.FPN_STRIDES) != len(f.IN_FEATURES):
            raise ValueError(
                f"MODEL.FCOS: {len(f.IN_FEATURES)} IN_FEATURES vs FPN_STRIDES {f.FPN_STRIDES}"
            )
        return {
            "fcos_head": FCOSHead(cfg, in_channels),
            "strides": list(f.FPN_STRIDES),
            "sizes_of_interest": list(f.SIZES_OF_INTEREST),
            "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
            "sample_in_mask": f.SAMPLE_IN_MASK,
            "focal_alpha": f.LOSS_ALPHA,
            "focal_gamma": f.LOSS_GAMMA,
            "inference_th": f.INFERENCE_TH,
            "pre_nms_topk": f.PRE_NMS_TOPK,
            "nms_th": f.NMS_TH,
            "post_nms_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "thresh_with_ctr": f.THRESH_WITH_CTR,
            "box_convention": f.BOX_CONVENTION,
            "iou_loss_smooth": f.IOU_LOSS_SMOOTH,
        }

    # ---- head ------------------------------------------------------------------------------
    def forward(self, features: list[Tensor]) -> dict:
        """Run the head and flatten its outputs over levels (L = sum_l H_l * W_l).

        Returns:
            dict: "logits" [B, L, C], "bbox_reg" [B, L, 4] (stride units), "ctrness" [B, L],
            "bbox_towers" (per-level list [B, C_in, H_l, W_l]), "locations" [L, 2] (x, y),
            "strides" [L], "level_index" [L] long, "level_sizes" list of (H_l, W_l).
        """
        if len(features) != len(self.strides):
            raise ValueError(f"FCOS expects {len(self.strides)} levels, got {len(features)}")
        head = self.fcos_head(features)
        sizes = [tuple(f.shape[-2:]) for f in features]
        return {
            "logits": cat_levels(head["logits"]),
            "bbox_reg": cat_levels(head["bbox_reg"]),
            "ctrness": cat_levels(head["ctrness"])[..., 0],
            "bbox_towers": head["bbox_towers"],
            **self.location_layout(sizes, features[0].device),
        }

    def location_layout(self, sizes: list[tuple[int, int]], device: torch.device) -> dict:
        """The per-location constants of levels of ``sizes`` (H_l, W_l): "locations" [L, 2],
        "strides" [L], "level_index" [L] and "level_sizes" (as :meth:`forward` returns them)."""
        sizes = [(int(h), int(w)) for h, w in sizes]
        locations = [compute_locations(h, w, s, device) for (h, w), s in zip(sizes, self.strides)]
        counts = [loc.shape[0] for loc in locations]
        level_index = torch.repeat_interleave(
            torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
        )
        strides = torch.tensor(self.strides, device=device, dtype=torch.float32)[level_index]
        return {
            "locations": torch.cat(locations),
            "strides": strides,
            "level_index": level_index,
            "level_sizes": sizes,
        }

    # ---- targets ---------------------------------------------------------------------------
    @torch.no_grad()
    def get_targets(self, outputs: dict, gt_instances: list[Instances]) -> dict[str, Tensor]:
        """FCOS assignment of every location to at most one GT (the smallest-area candidate).

        A location is a candidate for a GT when it lies in the GT's centre region (radius
        ``center_sampling_radius`` x stride around the box centre, clipped to the box; the whole
        box if the radius is 0), its max(l, t, r, b) is in its level's range, and, with
        ``sample_in_mask``, it lies inside the GT mask.

        Args:
            outputs: :meth:`forward`'s dict ("locations", "strides", "level_index" are used).
            gt_instances: per image, with gt_boxes [G, 4], gt_classes [G] and (for
                ``sample_in_mask``) gt_masks BitMasks [G, H, W] in the input frame.

        Returns:
            dict: "labels" [B, L] long (C = background), "reg_targets" [B, L, 4] l, t, r, b in
            stride units (0 for background), "gt_inds" [B, L] long (-1 = background).
        """
        locations, strides = outputs["locations"], outputs["strides"]
        ranges = torch.tensor(self.size_ranges, device=locations.device)[outputs["level_index"]]
        labels, reg_targets, gt_inds = [], [], []
        for inst in gt_instances:
            lab, reg, ind = self._targets_single(locations, strides, ranges, inst)
            labels.append(lab)
            reg_targets.append(reg)
            gt_inds.append(ind)
        return {
            "labels": torch.stack(labels),
            "reg_targets": torch.stack(reg_targets),
            "gt_inds": torch.stack(gt_inds),
        }

    def _targets_single(
        self, locations: Tensor, strides: Tensor, ranges: Tensor, inst: Instances
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_loc = locations.shape[0]
        boxes = inst.gt_boxes.tensor.to(locations.device).float()
        if self.inclusive_boxes:  # maskrcnn-benchmark GT: x2 = x + w - 1
            boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - 1], dim=1)
        if boxes.shape[0] == 0:
            return (
                torch.full((num_loc,), self.num_classes, dtype=torch.long, device=locations.device),
                locations.new_zeros((num_loc, 4)),
                torch.full((num_loc,), -1, dtype=torch.long, device=locations.device),
            )
        xs, ys = locations[:, 0:1], locations[:, 1:2]  # [L, 1]
        ltrb = torch.stack(
            [xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=2
        )  # [L, G, 4]
        if self.center_sampling_radius > 0:
            ctr = (boxes[:, :2] + boxes[:, 2:]) / 2  # [G, 2]
            radius = strides[:, None, None] * self.center_sampling_radius  # [L, 1, 1]
            lo = torch.maximum(ctr[None] - radius, boxes[None, :, :2])  # [L, G, 2]
            hi = torch.minimum(ctr[None] + radius, boxes[None, :, 2:])
            xy = locations[:, None, :]
            in_region = torch.cat([xy - lo, hi - xy], dim=2).min(dim=2).values > 0
        else:
            in_region = ltrb.min(dim=2).values > 0
        max_reg = ltrb.max(dim=2).values
        in_level = (max_reg >= ranges[:, 0:1]) & (max_reg <= ranges[:, 1:2])
        candidate = in_region & in_level
        if self.sample_in_mask:
            masks = inst.gt_masks.tensor.to(locations.device)  # [G, H, W]
            h, w = masks.shape[-2:]
            ix, iy = locations[:, 0].long(), locations[:, 1].long()
            inside = (ix < w) & (iy < h)
            in_mask = masks[:, iy.clamp(max=h - 1), ix.clamp(max=w - 1)].t() & inside[:, None]
            candidate = candidate & in_mask
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand_as(max_reg)
        area = torch.where(candidate, area, torch.full_like(area, INF))
        min_area, gt_ind = area.min(dim=1)
        background = min_area == INF
        labels = inst.gt_classes.to(locations.device)[gt_ind]
        labels = torch.where(background, torch.full_like(labels, self.num_classes), labels)
        reg = ltrb[torch.arange(num_loc, device=locations.device), gt_ind] / strides[:, None]
        reg = torch.where(background[:, None], torch.zeros_like(reg), reg)
        gt_ind = torch.where(background, torch.full_like(gt_ind, -1), gt_ind)
        return labels, reg, gt_ind

    # ---- losses ----------------------------------------------------------------------------
    def losses(self, outputs: dict, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Focal classification, centerness-weighted GIoU regression and centerness BCE.

        Normalisers (AdelaiDet): #positives and the sum of centerness targets, each averaged over
        processes; the first clamped to >= 1, the second to >= 1e-6.

        Returns:
            {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}: 0-d tensors (unweighted, as FCOS).
        """
        logits = outputs["logits"].flatten(0, 1)  # [B*L, C]
        labels = targets["labels"].flatten()
        pos = torch.nonzero(labels != self.num_classes).squeeze(1)
        num_pos = _reduce_mean(torch.tensor(float(pos.numel()), device=logits.device))
        num_pos = num_pos.clamp(min=1.0)
        cls_targets = F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes]
        loss_cls = sigmoid_focal_loss(
            logits,
            cls_targets.to(logits.dtype),
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="mean",
            avg_factor=num_pos,
        )
        reg_pred = outputs["bbox_reg"].flatten(0, 1)[pos]
        reg_tgt = targets["reg_targets"].flatten(0, 1)[pos]
        ctr_pred = outputs["ctrness"].flatten()[pos]
        ctr_tgt = centerness_targets(reg_tgt)
        ctr_norm = _reduce_mean(ctr_tgt.sum()).clamp(min=1e-6)
        if self.iou_loss_smooth > 0:
            loss_loc = fcos_iou_loss(reg_pred, reg_tgt, self.iou_loss_smooth)
        else:
            origin = reg_pred.new_zeros((reg_pred.shape[0], 2))
            loss_loc = giou_loss(
                ltrb_to_boxes(origin, reg_pred), ltrb_to_boxes(origin, reg_tgt), reduction="none"
            )
        loss_loc = (loss_loc * ctr_tgt).sum() / ctr_norm
        loss_ctr = bce_with_logits_loss(ctr_pred[:, None], ctr_tgt[:, None], avg_factor=num_pos)
        return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}

    # ---- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict_instances(
        self,
        outputs: dict,
        image_sizes: list[tuple[int, int]],
        top_feats: Tensor | None = None,
    ) -> list[Instances]:
        """Score threshold, per-level top-k, box decoding, clipping and class-wise NMS.

        Args:
            outputs: :meth:`forward`'s dict.
            image_sizes: per image (h, w) of the unpadded input.
            top_feats: optional [B, L, F] per-location features carried to the detections.

        Returns:
            per image Instances at the input size with pred_boxes, scores (cls * centerness),
            pred_classes, locations [n, 2], fpn_levels [n], and top_feat [n, F] if given.
            pred_boxes are in ``box_convention`` (inclusive pixel boxes for maskrcnn-benchmark;
            the meta-arch converts them at the output).
        """
        cls_prob = outputs["logits"].sigmoid()
        ctr_prob = outputs["ctrness"].sigmoid()
        boxes_all = ltrb_to_boxes(
            outputs["locations"][None], outputs["bbox_reg"] * outputs["strides"][None, :, None]
        )
        level_index = outputs["level_index"]
        results = []
        for i, (h, w) in enumerate(image_sizes):
            scores = cls_prob[i] * ctr_prob[i][:, None]  # [L, C]
            gate = scores if self.thresh_with_ctr else cls_prob[i]
            loc_idx, cls_idx, score = [], [], []
            offset = 0
            for lvl_h, lvl_w in outputs["level_sizes"]:
                sel = slice(offset, offset + lvl_h * lvl_w)
                cand = torch.nonzero(gate[sel] > self.inference_th)
                s = scores[sel][cand[:, 0], cand[:, 1]]
                if s.numel() > self.pre_nms_topk:
                    s, keep = s.topk(self.pre_nms_topk)
                    cand = cand[keep]
                loc_idx.append(cand[:, 0] + offset)
                cls_idx.append(cand[:, 1])
                score.append(s)
                offset += lvl_h * lvl_w
            loc_i, cls_i, score_i = torch.cat(loc_idx), torch.cat(cls_idx), torch.cat(score)
            boxes = boxes_all[i, loc_i].to(score_i.dtype)
            keep = self._nms(boxes, score_i, cls_i, (h, w))
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(boxes[keep])
            inst.scores = score_i[keep]
            inst.pred_classes = cls_i[keep]
            inst.locations = outputs["locations"][loc_i[keep]]
            inst.fpn_levels = level_index[loc_i[keep]]
            if top_feats is not None:
                inst.top_feat = top_feats[i, loc_i[keep]]
            results.append(inst)
        return results

    def _nms(self, boxes: Tensor, scores: Tensor, classes: Tensor, image_size) -> Tensor:
        """Clip [N, 4] ``boxes`` in place, class-wise NMS, keep ``post_nms_topk``.

        maskrcnn-benchmark: clip to size - 1, "+1" widths, and every detection scoring at least
        the ``post_nms_topk``-th score is kept (``kthvalue``); Detectron2: clip to size, the first
        ``post_nms_topk``. Returns [K] long indices by decreasing score.
        """
        h, w = image_size
        off = 1 if self.inclusive_boxes else 0
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w - off)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h - off)
        if not self.inclusive_boxes:
            return batched_nms(boxes, scores, classes, self.nms_th)[: self.post_nms_topk]
        keep = class_wise_nms(boxes, scores, classes, self.nms_th, plus_one=True)
        if keep.numel() > self.post_nms_topk > 0:
            kth = scores[keep][self.post_nms_topk - 1]
            keep = keep[scores[keep] >= kth]
        return keep
