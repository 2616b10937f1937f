"""The FPN neck of the K-Net detection models (P2..P5, no extra levels).

Provenance: mmdet ``FPN(num_outs=4, start_level=0)`` as the official configs use it: lateral 1x1
and output 3x3 convs with bias, no norm, nearest x2 top-down, xavier-uniform init. It is a
separate module (``neck``), not part of ``backbone``, so SOLVER.BACKBONE_MULTIPLIER (mmdet's
``backbone`` lr_mult 0.25) does not reach it, as in the official training.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F


class FPNNeck(nn.Module):
    """Feature pyramid over ``len(in_channels)`` backbone maps, all levels kept."""

    def __init__(self, *, in_channels: Sequence[int], out_channels: int = 256):
        """
        Args:
            in_channels: channels of the backbone maps, finest first (e.g. 256..2048).
            out_channels: channels of every output level.
        """
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """
        Args:
            features: backbone maps [B, in_channels[i], H_i, W_i], strides doubling.

        Returns:
            [B, out_channels, H_i, W_i] per level (P2..P5 for res2..res5).
        """
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
