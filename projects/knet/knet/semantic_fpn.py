"""The semantic-FPN neck of K-Net (official ``SemanticFPNWrapper``, Panoptic-FPN style).

Provenance: follows ``knet/det/semantic_fpn_wrapper.py`` (ZwwWayne/K-Net @5e50ee5) with the
released settings only (sum fusion, no coordinate channels, one aux conv); conv+GN+ReLU blocks
are Detectron2 ``Conv2d`` with a norm, so their state-dict names differ (see the README).
"""

from __future__ import annotations

import math

import torch
from detectron2.layers import Conv2d, get_norm
from torch import Tensor, nn


def conv_norm_relu(
    in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, norm: str = "GN"
) -> Conv2d:
    """mmcv ``ConvModule``: conv (bias only without a norm) -> norm -> ReLU."""
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=nn.ReLU(inplace=True),
    )


def sine_positional_encoding(
    batch: int,
    height: int,
    width: int,
    *,
    num_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
    device: torch.device | None = None,
) -> Tensor:
    """DETR/mmcv ``SinePositionalEncoding`` (normalize=True, offset 0) for an all-valid mask.

    Returns:
        [batch, 2 * num_feats, height, width]: y-encoding channels then x-encoding channels,
        each with sin/cos interleaved along the frequency axis.
    """
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_y = y[:, None] / dim_t  # [H, F]
    pos_x = x[:, None] / dim_t  # [W, F]
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat(
        (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)),
        dim=2,
    )
    return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


class SemanticFPN(nn.Module):
    """Fuses the FPN levels into one stride-8 map and returns the localization and semantic
    features (the ``localization_fpn`` of K-Net's ``ConvKernelHead``).

    Level ``i`` finer than ``out_level`` gets ``out_level - i`` stride-2 3x3 convs; level
    ``i >= out_level`` gets a 3x3 conv followed by ``i - out_level`` (bilinear x2, 3x3 conv)
    pairs. The level maps are summed; ``conv_pred`` and ``aux_convs[0]`` (1x1 conv-norm-ReLU)
    then give the localization and semantic features. Level ``pos_encoding_level`` gets the
    sine positional encoding added to its input.
    """

    def __init__(
        self,
        *,
        num_levels: int = 4,
        in_channels: int = 256,
        feat_channels: int = 256,
        out_channels: int = 256,
        out_level: int = 1,
        pos_encoding_level: int = 3,
        norm: str = "GN",
    ):
        """
        Args:
            num_levels: number of input levels (P2..P5 = 4), finest first, strides doubling.
            in_channels, feat_channels, out_channels: channels of inputs / level convs / outputs.
            out_level: index of the level whose resolution is the output's (1 = stride 8).
            pos_encoding_level: level that gets the sine positional encoding (-1: none); it
                needs ``in_channels`` even (num_feats = in_channels / 2).
            norm: Detectron2 norm name of every conv ("GN" = GroupNorm(32)).
        """
        super().__init__()
        self.out_level = out_level
        self.pos_encoding_level = pos_encoding_level
        self.in_channels = in_channels
        self.convs_all_levels = nn.ModuleList()
        for i in range(num_levels):
            level = nn.Sequential()
            if i < out_level:
                for j in range(out_level - i):
                    chn = in_channels if j == 0 else feat_channels
                    level.add_module(
                        f"conv{j}", conv_norm_relu(chn, feat_channels, 3, stride=2, norm=norm)
                    )
            else:
                level.add_module("conv0", conv_norm_relu(in_channels, feat_channels, 3, norm=norm))
                for j in range(1, i - out_level + 1):
                    level.add_module(
                        f"upsample{j - 1}",
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    )
                    level.add_module(
                        f"conv{j}", conv_norm_relu(feat_channels, feat_channels, 3, norm=norm)
                    )
            self.convs_all_levels.append(level)
        self.conv_pred = conv_norm_relu(feat_channels, out_channels, 1, norm=norm)
        self.aux_convs = nn.ModuleList([conv_norm_relu(feat_channels, out_channels, 1, norm=norm)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """
        Args:
            features: ``num_levels`` maps [B, in_channels, H_i, W_i], strides doubling from the
                first (e.g. P2..P5 at strides 4..32 of an input padded to a multiple of 32).

        Returns:
            (loc_feats, sem_feats): two [B, out_channels, H_o, W_o] maps at the resolution of
            ``features[out_level]``.
        """
        fused = None
        for i, (x, convs) in enumerate(zip(features, self.convs_all_levels)):
            if i == self.pos_encoding_level:
                b, _, h, w = x.shape
                pos = sine_positional_encoding(
                    b, h, w, num_feats=self.in_channels // 2, device=x.device
                )
                x = x + pos.to(x.dtype)
            y = convs(x)
            fused = y if fused is None else fused + y
        return self.conv_pred(fused), self.aux_convs[0](fused)
