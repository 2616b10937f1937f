"""The semantic-FPN neck of K-Net (official ``SemanticFPNWrapper``, Panoptic-FPN style).

Provenance: follows ``knet/det/semantic_fpn_wrapper.py`` (ZwwWayne/K-Net @5e50ee5) with the
released settings only (sum fusion, no coordinate channels, one aux conv); conv+GN+ReLU blocks
are Detectron2 ``Conv2d`` with a norm, so their state-dict names differ (see the README).
"""

from __future__ import annotations

from detectron2.layers import Conv2d, get_norm
from torch import Tensor, nn

from common.modeling.position_encoding import sine_position_encoding


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
                h, w = x.shape[-2:]
                pos = sine_position_encoding(
                    h, w, num_feats=self.in_channels // 2, device=x.device, dtype=x.dtype
                )
                x = x + pos
            y = convs(x)
            fused = y if fused is None else fused + y
        return self.conv_pred(fused), self.aux_convs[0](fused)
