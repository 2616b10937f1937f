"""Learned proposals and the six-stage query RoI head of QueryInst.

Provenance: follows QueryInst's ``EmbeddingRPNHead`` and ``QueryRoIHead`` (mmdet
``SparseRoIHead`` with masks): per stage, RoIAlign of the current boxes -> DIIHead -> box
refinement -> (boxes detached for the next stage); the stage's mask head reads 14x14 RoIs of
that stage's refined boxes and its post-attention query features. Differences: RoIs come from
Detectron2's ``ROIPooler`` (``ROIAlignV2``, canonical 224 @ P4, the same level rule as mmdet's
``finest_scale=56`` up to an eps) and deltas are decoded with ``Box2BoxTransform``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torch import Tensor, nn

from common.modeling.meta_arch import num_classes

from .dii_head import DIIHead, QueryAttention
from .mask_head import DynamicMaskHead


def _as_boxes(x: Tensor) -> Boxes:
    """``Boxes`` holding ``x`` itself: Detectron2's constructor casts to float32, which in a
    float64 run would be the one float32 step (RoIs rounded; the parity suite runs float64)."""
    boxes = Boxes(x.new_zeros((0, 4), dtype=torch.float32))
    boxes.tensor = x
    return boxes


def _apply_deltas(transform: Box2BoxTransform, deltas: Tensor, boxes: Tensor) -> Tensor:
    """``transform.apply_deltas`` (its weights and one-sided ``dw``/``dh`` clamp) computed in the
    dtype of ``deltas``, not cast to float32 as Detectron2's is: float32 runs are unchanged,
    float64 runs (the parity suite) stay float64.

    Args:
        deltas: [R, 4] (dx, dy, dw, dh); boxes: [R, 4] absolute xyxy. Returns [R, 4] xyxy.
    """
    if deltas.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return transform.apply_deltas(deltas, boxes)
    boxes = boxes.to(deltas.dtype)
    size = boxes[:, 2:] - boxes[:, :2]
    center = boxes[:, :2] + 0.5 * size
    wx, wy, ww, wh = transform.weights
    dxy = deltas[:, :2] / deltas.new_tensor([wx, wy])
    dwh = (deltas[:, 2:] / deltas.new_tensor([ww, wh])).clamp(max=transform.scale_clamp)
    center = dxy * size + center
    size = torch.exp(dwh) * size
    return torch.cat([center - 0.5 * size, center + 0.5 * size], dim=1)


class EmbeddingRPNHead(nn.Module):
    """Sparse R-CNN's learned proposal boxes and proposal features (one set shared by all images).

    ``init_proposal_bboxes`` stores normalised (cx, cy, w, h), initialised to the whole image;
    ``init_proposal_features`` is N(0, 1) as ``nn.Embedding``'s default.

    Args:
        num_proposals: N (100 or 300).
        proposal_feature_channel: C (256).
    """

    def __init__(self, num_proposals: int, proposal_feature_channel: int):
        super().__init__()
        self.num_proposals = num_proposals
        self.init_proposal_bboxes = nn.Embedding(num_proposals, 4)
        self.init_proposal_features = nn.Embedding(num_proposals, proposal_feature_channel)
        nn.init.constant_(self.init_proposal_bboxes.weight[:, :2], 0.5)
        nn.init.constant_(self.init_proposal_bboxes.weight[:, 2:], 1.0)

    def forward(self, image_whwh: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            image_whwh: [B, 4] (w, h, w, h) of every unpadded input image.

        Returns:
            proposal boxes [B, N, 4] absolute xyxy and proposal features [B, N, C].
        """
        center, size = self.init_proposal_bboxes.weight.split(2, dim=1)
        xyxy = torch.cat([center - 0.5 * size, center + 0.5 * size], dim=1)
        boxes = xyxy[None] * image_whwh[:, None, :]
        feats = self.init_proposal_features.weight[None].expand(image_whwh.shape[0], -1, -1)
        return boxes, feats


MASK_QUERY_SOURCES = ("shared", "own_msa", "separate")


class QueryRoIHead(nn.Module):
    """The cascade of ``num_stages`` (DIIHead, DynamicMaskHead) pairs with their RoI poolers.

    ``box_stage`` runs one box stage; ``mask_stage`` runs one stage's mask head on chosen
    queries. The stage loop and matching live in the meta-architecture, which interleaves them.
    """

    @configurable
    def __init__(
        self,
        *,
        box_pooler: ROIPooler,
        mask_pooler: ROIPooler,
        bbox_head: Sequence[DIIHead],
        mask_head: Sequence[DynamicMaskHead],
        box2box_transform: Box2BoxTransform,
        in_features: Sequence[str],
        mask_query: str = "shared",
        num_heads: int = 8,
        dropout: float = 0.0,
        num_proposals: int = 100,
    ):
        """
        Args:
            box_pooler: 7x7 RoIAlign over ``in_features`` (shared by the stages; no parameters).
            mask_pooler: 14x14 RoIAlign over ``in_features``.
            bbox_head: one DIIHead per stage.
            mask_head: one DynamicMaskHead per stage (same length), or one, for the last stage
                only (the ablation without parallel mask supervision).
            box2box_transform: decodes the DIIHead deltas relative to the stage's input boxes.
            in_features: FPN feature names, finest first (e.g. p2..p5).
            mask_query: the mask head's parameter source: "shared" (the DIIHead's
                post-attention query, the paper's), "own_msa" (the stage's input query through
                a self-attention + LN of the mask branch) or "separate" (``num_proposals``
                learnable mask queries of the mask branch through its own self-attention + LN
                per stage; matched to the detection queries by index).
            num_heads, dropout: of the mask branch's self-attention ("own_msa", "separate").
        """
        if mask_query not in MASK_QUERY_SOURCES:
            raise ValueError(
                f"MODEL.QUERYINST.MASK_QUERY must be one of {MASK_QUERY_SOURCES}, "
                f"got {mask_query!r}"
            )
        super().__init__()
        if len(mask_head) not in (1, len(bbox_head)) or not bbox_head:
            raise ValueError(f"{len(bbox_head)} box heads vs {len(mask_head)} mask heads")
        self.box_pooler = box_pooler
        self.mask_pooler = mask_pooler
        self.bbox_head = nn.ModuleList(bbox_head)
        self.mask_head = nn.ModuleList(mask_head)
        self.box2box_transform = box2box_transform
        self.in_features = list(in_features)
        self.mask_query = mask_query
        if mask_query != "shared":
            dim = self.bbox_head[0].attention_norm.normalized_shape[0]
            self.mask_attention = nn.ModuleList(
                QueryAttention(dim, num_heads, dropout) for _ in self.mask_head
            )
            self.mask_attention_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in self.mask_head)
        if mask_query == "separate":
            self.mask_query_embed = nn.Embedding(num_proposals, dim)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        q = cfg.MODEL.QUERYINST
        in_features = list(q.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.QUERYINST.IN_FEATURES {missing} not among backbone outputs "
                f"{sorted(input_shape)}"
            )
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"QueryInst needs equal channels on {in_features}, got {channels}")
        dim = channels.pop()
        if q.MASK_QUERY != "shared" and not q.MASK_DYNAMIC:
            raise ValueError(
                f"MODEL.QUERYINST.MASK_QUERY {q.MASK_QUERY!r} needs the dynamic mask head: "
                "with MODEL.QUERYINST.MASK_DYNAMIC False no query reaches the mask head"
            )
        scales = [1.0 / input_shape[f].stride for f in in_features]

        def pooler(res: int) -> ROIPooler:
            return ROIPooler(res, scales, q.POOLER_SAMPLING_RATIO, q.POOLER_TYPE)

        bbox_head = [
            DIIHead(
                num_classes=num_classes(cfg),
                in_channels=dim,
                num_heads=q.NUM_HEADS,
                feedforward_channels=q.DIM_FEEDFORWARD,
                dynamic_channels=q.DIM_DYNAMIC,
                pooler_resolution=q.BOX_POOLER_RESOLUTION,
                num_cls_fcs=q.NUM_CLS_FCS,
                num_reg_fcs=q.NUM_REG_FCS,
                dropout=q.DROPOUT,
            )
            for _ in range(q.NUM_STAGES)
        ]
        mask_head = [
            DynamicMaskHead(
                num_classes=num_classes(cfg),
                in_channels=dim,
                conv_dim=q.MASK_CONV_DIM,
                dynamic_channels=q.DIM_DYNAMIC,
                num_convs=q.MASK_NUM_CONVS,
                norm=q.MASK_NORM,
                dynamic=q.MASK_DYNAMIC,
            )
            # parallel supervision (the paper's): a mask head per stage; else the last only
            for _ in range(q.NUM_STAGES if q.PARALLEL_MASK_SUPERVISION else 1)
        ]
        return {
            "box_pooler": pooler(q.BOX_POOLER_RESOLUTION),
            "mask_pooler": pooler(q.MASK_POOLER_RESOLUTION),
            "bbox_head": bbox_head,
            "mask_head": mask_head,
            "box2box_transform": Box2BoxTransform(weights=tuple(q.BBOX_REG_WEIGHTS)),
            "in_features": in_features,
            "mask_query": q.MASK_QUERY,
            "num_heads": q.NUM_HEADS,
            "dropout": q.DROPOUT,
            "num_proposals": q.NUM_PROPOSALS,
        }

    @property
    def num_stages(self) -> int:
        return len(self.bbox_head)

    def has_mask_head(self, stage: int) -> bool:
        """Whether ``stage`` predicts masks (all stages, or the last without parallel
        supervision)."""
        return len(self.mask_head) == self.num_stages or stage == self.num_stages - 1

    def select_features(self, features: dict[str, Tensor]) -> list[Tensor]:
        """The pooled FPN levels, finest first: list of [B, C, H_l, W_l]."""
        return [features[f] for f in self.in_features]

    def box_stage(
        self, stage: int, features: list[Tensor], boxes: Tensor, proposal_features: Tensor
    ) -> dict[str, Tensor]:
        """Run stage ``stage``'s DIIHead on the current boxes.

        Args:
            features: FPN levels from :meth:`select_features`.
            boxes: [B, N, 4] absolute xyxy input boxes of this stage (detached).
            proposal_features: [B, N, C] queries.

        Returns:
            ``pred_logits`` [B, N, K], ``pred_boxes`` [B, N, 4] refined absolute xyxy (with
            gradient to the deltas), ``object_features`` [B, N, C], ``attn_features`` [B, N, C]
            (the mask head's parameter source: the DIIHead's post-attention query, or the mask
            branch's own attention with ``mask_query`` "own_msa" / "separate").
        """
        b, n = boxes.shape[:2]
        rois = self.box_pooler(features, [_as_boxes(x) for x in boxes])  # [B*N, C, 7, 7]
        out = self.bbox_head[stage](rois, proposal_features)
        refined = _apply_deltas(
            self.box2box_transform, out["box_deltas"].reshape(b * n, 4), boxes.reshape(b * n, 4)
        ).view(b, n, 4)
        attn = out["attn_features"]
        if self.mask_query != "shared" and self.has_mask_head(stage):
            # the ablation's mask-query sources: the mask head reads the mask branch's own
            # self-attention over the stage input query ("own_msa") or over its own queries
            i = stage if len(self.mask_head) == self.num_stages else 0
            source = proposal_features
            if self.mask_query == "separate":
                source = self.mask_query_embed.weight[None].expand(b, -1, -1)
            attn = self.mask_attention_norm[i](self.mask_attention[i](source))
        return {
            "pred_logits": out["cls_logits"],
            "pred_boxes": refined,
            "object_features": out["object_features"],
            "attn_features": attn,
        }

    def mask_stage(
        self,
        stage: int,
        features: list[Tensor],
        boxes: Sequence[Tensor],
        attn_features: Tensor,
    ) -> Tensor:
        """Run stage ``stage``'s mask head on some queries of every image.

        Args:
            features: FPN levels from :meth:`select_features`.
            boxes: B tensors [P_b, 4], absolute xyxy (detached) boxes of the chosen queries.
            attn_features: [sum P_b, C] their post-attention features, image-major.

        Returns:
            [sum P_b, K, 2r, 2r] class-specific mask logits (28x28 for r = 14).
        """
        if not self.has_mask_head(stage):
            raise ValueError(f"stage {stage} has no mask head (no parallel mask supervision)")
        rois = self.mask_pooler(features, [_as_boxes(x) for x in boxes])
        head = self.mask_head[stage if len(self.mask_head) == self.num_stages else 0]
        return head(rois, attn_features)
