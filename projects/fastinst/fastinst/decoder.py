"""FastInst's dual-path transformer decoder with GT-mask-guided learning (paper Sec. 3.3-3.4).

Each layer first updates the pixel features (E3 tokens attend to the queries: cross-attention +
FFN), then the queries (masked cross-attention to the updated pixels, self-attention, FFN). The
masked attention of layer i uses the mask predicted after layer i-1. In training, the matched GT
masks replace the predicted ones: every layer is run again on its own main-pass output with the GT
attention mask, and those outputs keep the last layer's matching (fixed matching).

Provenance: follows the official ``FastInstDecoder`` (same parameter names, heads at L+1 points,
class head evaluated only at the last layer in inference, guided passes fed ``memory[i+1]`` as
implemented); differences: the positional embedding is initialised (official: ``torch.empty``,
issue #57), a sine embedding can replace it, dropout is configurable, the number of IA queries is
clipped to the E4 size for tiny inputs, and the matcher is passed to ``forward`` rather than stored
on the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from torch import Tensor, nn
from torch.nn import functional as F

from common.modeling.meta_arch import num_classes
from common.modeling.position_encoding import sine_position_encoding

from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .query_proposal import QueryProposal

__all__ = ["FastInstDecoder"]

Matching = list[tuple[Tensor, Tensor]]


class FastInstDecoder(nn.Module):
    """Dual-path transformer decoder with IA-guided and auxiliary learnable queries."""

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_aux_queries: int = 8,
        nheads: int = 8,
        dim_feedforward: int = 1024,
        dec_layers: int = 1,
        pre_norm: bool = False,
        dropout: float = 0.0,
        mask_dim: int = 256,
        pos_embed: str = "learnable",
        pos_embed_grid: int = 0,
        gt_mask_guided: bool = True,
        deep_supervision: bool = True,
        query_type: str = "ia_guided",
        local_maximum: bool = True,
        dual_path: bool = True,
    ):
        """
        Args:
            num_classes: C foreground classes (heads predict C + 1, no-object last).
            hidden_dim: D, width of queries and pixel features (= pixel decoder channels).
            num_queries: N_a IA queries; num_aux_queries: N_b auxiliary learnable queries.
            nheads, dim_feedforward, pre_norm, dropout: transformer block settings.
            dec_layers: L dual-path layers (FastInst-D1: 1, D3: 3; 0 = IA queries only).
            mask_dim: width of mask embeddings and projected pixel features.
            pos_embed: "learnable" (a resized [1, D, g, g] table) or "sine".
            pos_embed_grid: g for the learnable table; 0 = round(sqrt(num_queries)) (official).
            gt_mask_guided: run the GT-mask-guided passes in training.
            deep_supervision: return ``aux_outputs`` (every layer and the guided passes).
            query_type: "ia_guided" (the paper's instance-activation-guided queries) or
                "learned" (its ablation: N_a static learnable queries, content and position,
                as DETR/Mask2Former; no proposal head, no locations).
            local_maximum: the +1 priority of local maxima in IA query selection.
            dual_path: update the pixel features in every layer (the paper's dual-path
                decoder); False: the single-path ablation, only the queries are updated.
        """
        super().__init__()
        if pos_embed not in ("learnable", "sine"):
            raise ValueError(f"pos_embed must be 'learnable' or 'sine', got {pos_embed!r}")
        if query_type not in ("ia_guided", "learned"):
            raise ValueError(f"query_type must be 'ia_guided' or 'learned', got {query_type!r}")
        self.query_type = query_type
        self.dual_path = dual_path
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.hidden_dim = hidden_dim
        self.pos_embed_type = pos_embed
        self.gt_mask_guided = gt_mask_guided
        self.deep_supervision = deep_supervision

        if pos_embed == "learnable":
            grid = pos_embed_grid or int(round(math.sqrt(num_queries)))
            self.meta_pos_embed = nn.Parameter(torch.empty(1, hidden_dim, grid, grid))
            nn.init.trunc_normal_(self.meta_pos_embed, std=0.02)
        else:
            self.meta_pos_embed = None
        if dec_layers == 0:
            num_aux_queries = 0  # they only take part in attention: without layers, unused
        self.num_aux_queries = num_aux_queries
        if num_aux_queries > 0:
            self.empty_query_features = nn.Embedding(num_aux_queries, hidden_dim)
            self.empty_query_pos_embed = nn.Embedding(num_aux_queries, hidden_dim)
        if query_type == "ia_guided":
            self.query_proposal = QueryProposal(
                hidden_dim, num_queries, num_classes, local_maximum=local_maximum
            )
        else:
            self.query_features = nn.Embedding(num_queries, hidden_dim)
            self.query_pos_embed = nn.Embedding(num_queries, hidden_dim)

        def stack(make: Callable[[], nn.Module], n: int) -> nn.ModuleList:
            return nn.ModuleList(make() for _ in range(n))

        def attn_block(cls):
            return lambda: cls(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)

        def ffn_block():
            return FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, normalize_before=pre_norm)

        L = dec_layers
        # pixel-feature path: pixels attend to queries (not built in the single-path ablation)
        if dual_path:
            self.transformer_mask_cross_attention_layers = stack(attn_block(CrossAttentionLayer), L)
            self.transformer_mask_ffn_layers = stack(ffn_block, L)
        # query path: masked cross-attention, self-attention, FFN
        self.transformer_query_cross_attention_layers = stack(attn_block(CrossAttentionLayer), L)
        self.transformer_query_self_attention_layers = stack(attn_block(SelfAttentionLayer), L)
        self.transformer_query_ffn_layers = stack(ffn_block, L)
        # prediction heads: index 0 before the first layer, index i+1 after layer i
        self.decoder_query_norm_layers = stack(lambda: nn.LayerNorm(hidden_dim), L + 1)
        self.class_embed_layers = stack(
            lambda: MLP(hidden_dim, hidden_dim, num_classes + 1, 3), L + 1
        )
        self.mask_embed_layers = stack(lambda: MLP(hidden_dim, hidden_dim, mask_dim, 3), L + 1)
        self.mask_features_layers = stack(lambda: nn.Linear(hidden_dim, mask_dim), L + 1)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        f = cfg.MODEL.FASTINST
        return {
            "num_classes": num_classes(cfg),
            "hidden_dim": f.HIDDEN_DIM,
            "num_queries": f.NUM_OBJECT_QUERIES,
            "num_aux_queries": f.NUM_AUX_QUERIES,
            "nheads": f.NHEADS,
            "dim_feedforward": f.DIM_FEEDFORWARD,
            "dec_layers": f.DEC_LAYERS,
            "pre_norm": f.PRE_NORM,
            "dropout": f.DROPOUT,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "pos_embed": f.POS_EMBED,
            "pos_embed_grid": f.POS_EMBED_GRID,
            "gt_mask_guided": f.GT_MASK_GUIDED,
            "deep_supervision": f.DEEP_SUPERVISION,
            "query_type": f.QUERY_TYPE,
            "local_maximum": f.LOCAL_MAXIMUM,
            "dual_path": f.DUAL_PATH,
        }

    # ---- positional embedding ------------------------------------------------------------
    def position_embedding(self, size: Sequence[int], ref: Tensor) -> Tensor:
        """[1, D, H, W] positional embedding for an H x W map (``ref`` gives device/dtype)."""
        size = (int(size[0]), int(size[1]))
        if self.meta_pos_embed is None:
            return sine_position_encoding(
                *size, num_feats=self.hidden_dim // 2, device=ref.device, dtype=ref.dtype
            )
        return F.interpolate(self.meta_pos_embed, size=size, mode="bilinear", align_corners=False)

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        proposal_features: Tensor,
        pixel_features: Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
        matcher: Callable[[dict[str, Any], Sequence[dict]], Matching] | None = None,
    ) -> dict[str, Any]:
        """
        Args:
            proposal_features: E4 [B, D, H4, W4] (IA query selection).
            pixel_features: E3 [B, D, H3, W3] (pixel path and mask features).
            targets: training targets (``labels`` [G], ``masks`` [G, H, W] in the padded input
                frame), needed with ``matcher`` for GT-mask-guided learning.
            matcher: ``matcher(outputs, targets) -> [(query_idx, target_idx)] * B``.
        Returns:
            dict with ``pred_logits`` [B, K, C+1], ``pred_masks`` [B, K, H3, W3] logits,
            ``pred_locations`` [B, K, 2] normalised (x, y) of the IA queries,
            ``proposal_cls_logits`` [B, C+1, H4, W4] and, in training with deep supervision,
            ``aux_outputs``: the L guided passes (with ``pred_matching_indices``), then the
            initial prediction and layers 0..L-2 (K = min(N_a, H4*W4)).
        """
        b = pixel_features.shape[0]
        pixel_size = pixel_features.shape[-2:]
        pixel_pos = self.position_embedding(pixel_size, pixel_features).flatten(2).transpose(1, 2)
        located: dict[str, Tensor] = {}  # the IA queries' locations (no learned-query ablation)
        if self.query_type == "ia_guided":
            proposal_pos = self.position_embedding(proposal_features.shape[-2:], proposal_features)
            proposals = self.query_proposal(proposal_features, proposal_pos)
            queries, query_pos = proposals.features, proposals.pos
            located["pred_locations"] = proposals.locations
        else:
            queries = self.query_features.weight[None].expand(b, -1, -1)
            query_pos = self.query_pos_embed.weight[None].expand(b, -1, -1)
        num_queries = queries.shape[1]

        if self.num_aux_queries > 0:
            aux = self.empty_query_features.weight[None].expand(b, -1, -1)
            aux_pos = self.empty_query_pos_embed.weight[None].expand(b, -1, -1)
            queries = torch.cat([queries, aux], dim=1)
            query_pos = torch.cat([query_pos, aux_pos], dim=1)
        pixels = pixel_features.flatten(2).transpose(1, 2)  # [B, H3*W3, D]

        guided = self.training and self.gt_mask_guided and self.deep_supervision
        guided = guided and targets is not None and matcher is not None and self.num_layers > 0
        logits, masks = self._predict(queries, pixels, pixel_size, num_queries, 0)
        predictions = [(logits, masks)]
        memory = [(queries, pixels)]
        for i in range(self.num_layers):
            attn_mask = self._attention_mask(masks)
            queries, pixels = self._layer(i, queries, pixels, query_pos, pixel_pos, attn_mask)
            logits, masks = self._predict(queries, pixels, pixel_size, num_queries, i + 1)
            predictions.append((logits, masks))
            memory.append((queries, pixels))

        out: dict[str, Any] = {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            **located,
        }
        if self.query_type == "ia_guided":
            out["proposal_cls_logits"] = proposals.cls_logits
        if not (self.training and self.deep_supervision):
            return out
        aux = [{"pred_logits": lg, "pred_masks": mk, **located} for lg, mk in predictions[:-1]]
        if guided:
            matching = matcher(
                {k: out[k] for k in ("pred_logits", "pred_masks", *located)}, targets
            )
            gt_mask = self._gt_attention_mask(matching, targets, pixel_size, num_queries)
            guided_outputs = []
            for i in range(self.num_layers):
                q, p = self._layer(i, *memory[i + 1], query_pos, pixel_pos, gt_mask)
                lg, mk = self._predict(q, p, pixel_size, num_queries, i + 1)
                guided_outputs.append(
                    {
                        "pred_logits": lg,
                        "pred_masks": mk,
                        **located,
                        "pred_matching_indices": matching,
                    }
                )
            aux = guided_outputs + aux
        out["aux_outputs"] = aux
        return out

    def _layer(
        self,
        i: int,
        queries: Tensor,
        pixels: Tensor,
        query_pos: Tensor,
        pixel_pos: Tensor,
        attn_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One dual-path layer. queries [B, K+A, D], pixels [B, HW, D], attn_mask
        [B*nheads, K+A, HW] bool. Returns the updated (queries, pixels)."""
        if self.dual_path:
            pixels = self.transformer_mask_cross_attention_layers[i](
                pixels, queries, pos=query_pos, query_pos=pixel_pos
            )
            pixels = self.transformer_mask_ffn_layers[i](pixels)
        queries = self.transformer_query_cross_attention_layers[i](
            queries, pixels, memory_mask=attn_mask, pos=pixel_pos, query_pos=query_pos
        )
        queries = self.transformer_query_self_attention_layers[i](queries, query_pos=query_pos)
        queries = self.transformer_query_ffn_layers[i](queries)
        return queries, pixels

    def _predict(
        self, queries: Tensor, pixels: Tensor, size: Sequence[int], num_queries: int, idx: int
    ) -> tuple[Tensor | None, Tensor]:
        """Heads at point ``idx`` (0 = before layer 0). Returns (class logits [B, K, C+1] or None
        when not needed in inference, mask logits [B, K, H3, W3])."""
        q = self.decoder_query_norm_layers[idx](queries[:, :num_queries])
        logits = None
        if self.training or idx == self.num_layers:
            logits = self.class_embed_layers[idx](q)
        mask_embed = self.mask_embed_layers[idx](q)
        mask_features = self.mask_features_layers[idx](pixels)
        masks = torch.einsum("bqc,blc->bql", mask_embed, mask_features)
        return logits, masks.reshape(masks.shape[0], num_queries, int(size[0]), int(size[1]))

    def _finish_mask(self, blocked: Tensor) -> Tensor:
        """[B, K, HW] bool (True = blocked) -> [B*nheads, K+A, HW]: aux rows never blocked,
        fully blocked rows unblocked, repeated per head, detached."""
        blocked = F.pad(blocked, (0, 0, 0, self.num_aux_queries), value=False)
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return blocked.detach().repeat_interleave(self.num_heads, dim=0)

    def _attention_mask(self, mask_logits: Tensor) -> Tensor:
        """Masked attention from the previous prediction: a pixel is blocked where the query's
        mask logit < 0. mask_logits [B, K, H, W] -> [B*nheads, K+A, H*W] bool."""
        return self._finish_mask(mask_logits.detach().flatten(2) < 0)

    def _gt_attention_mask(
        self,
        matching: Matching,
        targets: Sequence[dict[str, Tensor]],
        size: Sequence[int],
        num_queries: int,
    ) -> Tensor:
        """GT attention mask: a matched query sees only its GT mask (nearest-downsampled to E3);
        unmatched queries see everything. Returns [B*nheads, K+A, H3*W3] bool."""
        h, w = int(size[0]), int(size[1])
        device = targets[0]["labels"].device if len(targets) else torch.device("cpu")
        blocked = torch.zeros(len(targets), num_queries, h * w, dtype=torch.bool, device=device)
        for i, ((src, tgt), target) in enumerate(zip(matching, targets)):
            if len(src) == 0:
                continue
            gt = target["masks"][tgt.to(target["masks"].device)].float()
            gt = F.interpolate(gt[None], size=(h, w), mode="nearest")[0]
            blocked[i, src.to(device)] = gt.flatten(1) < 0.5
        return self._finish_mask(blocked)
