"""The Dynamic Instance Interactive head (DIIHead) of one QueryInst / Sparse R-CNN stage.

Provenance: follows QueryInst's ``bbox_heads/dii_head.py`` (mmdet ``DIIHead``): self-attention over
the queries, dynamic instance interaction with the stage's 7x7 RoI features, FFN, then the
classification (sigmoid, no background) and box-delta branches. Module/parameter names mirror the
official checkpoint keys (``attention.attn``, ``instance_interactive_conv``, ``ffn.layers.0.0``,
``cls_fcs``, ``reg_fcs``, ``fc_cls``, ``fc_reg``). Differences: the deltas are decoded by the
caller with Detectron2's ``Box2BoxTransform`` (one-sided ``dw``/``dh`` clamp, see the README).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .dynamic_conv import DynamicConv


class QueryAttention(nn.Module):
    """Multi-head self-attention over the queries of each image with a residual (mmcv's
    ``MultiheadAttention``: ``x + dropout(MHA(x, x, x))``; no positional encoding).

    Args:
        embed_dims: query channels C.
        num_heads: attention heads.
        dropout: dropout on the attention weights and on the residual branch.
    """

    def __init__(self, embed_dims: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        return x + self.proj_drop(self.attn(x, x, x, need_weights=False)[0])


class FFN(nn.Module):
    """Two-layer feed-forward network with a residual (mmcv ``FFN``, ``num_fcs=2``, ReLU).

    Args:
        embed_dims: C.
        feedforward_channels: hidden width (2048 in the paper).
        dropout: dropout after each layer.
    """

    def __init__(self, embed_dims: int, feedforward_channels: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(
                nn.Linear(embed_dims, feedforward_channels),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., C] -> [..., C]."""
        return x + self.layers(x)


def _fc_ln_relu(channels: int, num: int) -> nn.ModuleList:
    layers = nn.ModuleList()
    for _ in range(num):
        layers.extend(
            [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(True)]
        )
    return layers


class DIIHead(nn.Module):
    """One stage's box head: queries + RoI features -> class logits, box deltas, new queries.

    Args:
        num_classes: K (no background logit; sigmoid focal classification).
        in_channels: query / FPN channels C (256).
        num_heads: self-attention heads (8).
        feedforward_channels: FFN hidden width (2048).
        dynamic_channels: bottleneck F of the dynamic interaction (64).
        pooler_resolution: RoI side r of the box features (7).
        num_cls_fcs: [Linear, LN, ReLU] blocks before ``fc_cls`` (1).
        num_reg_fcs: [Linear, LN, ReLU] blocks before ``fc_reg`` (3).
        dropout: dropout of attention, interaction residual and FFN (0 in the configs).
        prior_prob: initial foreground probability of ``fc_cls`` (bias -4.595 for 0.01).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        dynamic_channels: int = 64,
        pooler_resolution: int = 7,
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        dropout: float = 0.0,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.attention = QueryAttention(in_channels, num_heads, dropout)
        self.attention_norm = nn.LayerNorm(in_channels)
        self.instance_interactive_conv = DynamicConv(
            in_channels, dynamic_channels, in_channels, pooler_resolution, with_proj=True
        )
        self.instance_interactive_conv_dropout = nn.Dropout(dropout)
        self.instance_interactive_conv_norm = nn.LayerNorm(in_channels)
        self.ffn = FFN(in_channels, feedforward_channels, dropout)
        self.ffn_norm = nn.LayerNorm(in_channels)
        self.cls_fcs = _fc_ln_relu(in_channels, num_cls_fcs)
        self.fc_cls = nn.Linear(in_channels, num_classes)
        self.reg_fcs = _fc_ln_relu(in_channels, num_reg_fcs)
        self.fc_reg = nn.Linear(in_channels, 4)
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        # official: xavier_uniform on every parameter with dim > 1, fc_reg bias 0, focal prior bias
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_reg.bias, 0.0)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, roi_features: Tensor, proposal_features: Tensor) -> dict[str, Tensor]:
        """
        Args:
            roi_features: [B*N, C, r, r] RoI features of the stage's boxes (image-major order).
            proposal_features: [B, N, C] queries from the previous stage.

        Returns:
            dict with ``cls_logits`` [B, N, K], ``box_deltas`` [B, N, 4] (dx, dy, dw, dh before the
            box transform), ``object_features`` [B, N, C] (next stage's queries) and
            ``attn_features`` [B, N, C] (post self-attention; the mask head's parameter source).
        """
        b, n, c = proposal_features.shape
        if roi_features.shape[0] != b * n:
            raise ValueError(f"{roi_features.shape[0]} RoI features for {b}x{n} queries")
        attn_features = self.attention_norm(self.attention(proposal_features))
        queries = attn_features.reshape(b * n, c)
        interact = self.instance_interactive_conv(queries, roi_features)
        obj = self.instance_interactive_conv_norm(
            queries + self.instance_interactive_conv_dropout(interact)
        )
        obj = self.ffn_norm(self.ffn(obj))
        cls_feat, reg_feat = obj, obj
        for layer in self.cls_fcs:
            cls_feat = layer(cls_feat)
        for layer in self.reg_fcs:
            reg_feat = layer(reg_feat)
        return {
            "cls_logits": self.fc_cls(cls_feat).view(b, n, -1),
            "box_deltas": self.fc_reg(reg_feat).view(b, n, 4),
            "object_features": obj.view(b, n, c),
            "attn_features": attn_features,
        }
