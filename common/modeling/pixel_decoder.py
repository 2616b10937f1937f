"""Multi-scale deformable-attention pixel decoder (Mask2Former, Cheng et al., CVPR 2022).

``QSMSDeformAttnPixelDecoder`` (``SEM_SEG_HEADS_REGISTRY``): a Deformable-DETR encoder over the
``DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES`` levels (res3-res5 by default), then an FPN that
merges the finer ``IN_FEATURES`` levels (res2) down to ``COMMON_STRIDE``, and a 1x1 conv giving
the mask features. Follows Mask2Former's ``MSDeformAttnPixelDecoder`` (same layers, init and
outputs); differences: no padding masks (Mask2Former passes all-False ones), autocast is left on
(the op computes in float32 itself, see ``common.ops.ms_deform_attn``), and the number of
multi-scale outputs is the number of encoder levels rather than a hard-coded 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from common.modeling.position_encoding import sine_position_encoding
from common.ops.ms_deform_attn import MSDeformAttn

__all__ = [
    "PositionEmbeddingSine",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnEncoder",
    "QSMSDeformAttnPixelDecoder",
]


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised sine position encoding as a module:
    (N, C, H, W) -> (N, 2 * num_pos_feats, H, W) (see ``common.modeling.position_encoding``)."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) (only shape, device used) -> float32 (N, 2 * num_pos_feats, H, W)."""
        pos = sine_position_encoding(
            x.shape[2],
            x.shape[3],
            num_feats=self.num_pos_feats,
            temperature=self.temperature,
            device=x.device,
        )
        return pos.expand(x.shape[0], -1, -1, -1)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + residual + LN, FFN + residual + LN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """
        Args:
            src: (N, S, C) tokens of all levels; pos: (N, S, C) position + level embedding.
            reference_points: (N, S, L, 2); spatial_shapes: (L, 2); level_start_index: (L,).

        Returns:
            (N, S, C).
        """
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """A stack of ``MSDeformAttnEncoderLayer`` with a learnable per-level embedding."""

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 6,
        d_ffn: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        # Held as ``encoder.layers`` so parameter names match Mask2Former's checkpoints
        # (``pixel_decoder.transformer.encoder.layers.{i}.*``, ``transformer.level_embed``).
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points)
            for _ in range(num_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            layer.self_attn._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], batch: int, like: Tensor) -> Tensor:
        """Pixel centres of every level, normalised: (N, S, L, 2) (x, y) in (0, 1)."""
        points = []
        for h, w in shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=like.device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=like.device) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        ref = torch.cat(points, 0)  # (S, 2)
        return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """
        Args:
            srcs: L maps (N, C, H_l, W_l); pos_embeds: L maps (N, C, H_l, W_l).

        Returns:
            (memory (N, S, C), spatial_shapes (L, 2) int64, level_start_index (L,) int64).
        """
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(pos_embeds)],
            1,
        )
        device = src.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        ref = self.reference_points(shapes, src.shape[0], src)
        for layer in self.encoder.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index)
        return src, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class QSMSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former-style pixel decoder: deformable-attention encoder over res3-res5 plus an FPN."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        transformer_in_features: Sequence[str],
        transformer_enc_layers: int,
        transformer_nheads: int,
        transformer_n_points: int,
        transformer_dim_feedforward: int,
        transformer_dropout: float,
        conv_dim: int,
        mask_dim: int,
        norm: str | None,
        common_stride: int,
    ) -> None:
        """
        Args:
            input_shape: the backbone features this decoder reads (e.g. res2..res5).
            transformer_in_features: the levels encoded by deformable attention (e.g. res3..res5).
            transformer_enc_layers: encoder layers.
            transformer_nheads, transformer_n_points: heads and points per head and level.
            transformer_dim_feedforward, transformer_dropout: encoder FFN width and dropout.
            conv_dim: channels of every level after projection (and of the outputs).
            mask_dim: channels of ``mask_features``.
            norm: normalisation of the FPN convs (e.g. "GN").
            common_stride: stride of ``mask_features``; levels between it and the finest encoder
                level are merged in by the FPN.
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)  # fine -> coarse
        self.in_features = [k for k, _ in shapes]
        enc_shapes = [(k, v) for k, v in shapes if k in transformer_in_features]
        if len(enc_shapes) != len(transformer_in_features):
            raise ValueError(f"{transformer_in_features} must be a subset of {self.in_features}")
        self.transformer_in_features = [k for k, _ in enc_shapes]  # fine -> coarse
        n_levels = len(enc_shapes)
        # Input projections, coarse -> fine (Mask2Former's order and names).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(v.channels, conv_dim, 1), nn.GroupNorm(32, conv_dim))
            for _, v in reversed(enc_shapes)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnEncoder(
            d_model=conv_dim,
            num_layers=transformer_enc_layers,
            d_ffn=transformer_dim_feedforward,
            dropout=transformer_dropout,
            n_levels=n_levels,
            n_heads=transformer_nheads,
            n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.common_stride = common_stride
        finest_enc_stride = enc_shapes[0][1].stride
        # (stride of mask_features, strides of multi_scale_features coarse -> fine): read by
        # common.modeling.neck.PixelDecoderNeck, which serves this decoder as a method's neck
        self.output_strides = (common_stride, [v.stride for _, v in reversed(enc_shapes)])
        self.num_fpn_levels = max(0, int(math.log2(finest_enc_stride) - math.log2(common_stride)))
        fpn_shapes = [(k, v) for k, v in shapes if v.stride < finest_enc_stride]
        fpn_shapes = fpn_shapes[len(fpn_shapes) - self.num_fpn_levels :]
        self.fpn_features = [k for k, _ in fpn_shapes]  # fine -> coarse
        # Registered as adapter_i / layer_i with i = 1 for the finest level (Mask2Former's names);
        # the plain lists below hold the same modules coarse -> fine, in the order they run.
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for idx, (_, v) in enumerate(fpn_shapes):
            lateral = Conv2d(v.channels, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(
                conv_dim,
                conv_dim,
                3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.num_multi_scale = n_levels

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict:
        h = cfg.MODEL.SEM_SEG_HEAD
        d = cfg.MODEL.MSDA_PIXEL_DECODER
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in h.IN_FEATURES},
            "transformer_in_features": list(h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "transformer_enc_layers": h.TRANSFORMER_ENC_LAYERS,
            "transformer_nheads": d.NHEADS,
            "transformer_n_points": d.NUM_POINTS,
            "transformer_dim_feedforward": d.DIM_FEEDFORWARD,
            "transformer_dropout": d.DROPOUT,
            "conv_dim": h.CONVS_DIM,
            "mask_dim": h.MASK_DIM,
            "norm": h.NORM,
            "common_stride": h.COMMON_STRIDE,
        }

    def forward_features(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """
        Args:
            features: backbone maps {name: (N, C_name, H_name, W_name)}.

        Returns:
            mask_features: (N, mask_dim, H / common_stride, W / common_stride);
            transformer_encoder_features: (N, conv_dim, H_c, W_c), the coarsest encoder level;
            multi_scale_features: encoder levels coarse -> fine, each (N, conv_dim, H_l, W_l).
        """
        srcs, pos = [], []
        for idx, name in enumerate(reversed(self.transformer_in_features)):  # coarse -> fine
            x = self.input_proj[idx](features[name])
            srcs.append(x)
            pos.append(self.pe_layer(x).to(x.dtype))
        memory, spatial_shapes, _ = self.transformer(srcs, pos)
        N = memory.shape[0]
        out = [
            m.transpose(1, 2).reshape(N, -1, h, w)
            for m, (h, w) in zip(
                memory.split([s.shape[-2] * s.shape[-1] for s in srcs], dim=1),
                [tuple(s.shape[-2:]) for s in srcs],
            )
        ]
        multi_scale_features = out[: self.num_multi_scale]
        for idx, name in enumerate(reversed(self.fpn_features)):  # coarse -> fine
            lateral = self.lateral_convs[idx](features[name])
            y = lateral + F.interpolate(
                out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            out.append(self.output_convs[idx](y))
        return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Same as ``forward_features``."""
        return self.forward_features(features)
