"""The sine positional encoding every QuerySeg module uses (K-Net's semantic FPN, FastInst's sine
ablation, the MSDeformAttn pixel decoder).

DETR's normalised form (mmcv ``SinePositionalEncoding(normalize=True, offset=0)``, Mask2Former's
``PositionEmbeddingSine(normalize=True)``) for an all-valid (unpadded) mask: position
``(i + 1) / (n + eps) * scale`` along each axis, ``num_feats`` frequencies
``temperature ** (2 * (k // 2) / num_feats)``, sin/cos interleaved, y channels before x channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_encoding(
    height: int,
    width: int,
    *,
    num_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sine encoding of an unmasked ``height x width`` grid.

    Returns:
        [1, 2 * num_feats, height, width] (expand over the batch as needed): channels
        [0, num_feats) encode y, [num_feats, 2 * num_feats) encode x.
    """
    f32 = {"dtype": torch.float32, "device": device}
    y = torch.arange(1, height + 1, **f32) / (height + eps) * scale
    x = torch.arange(1, width + 1, **f32) / (width + eps) * scale
    dim_t = torch.arange(num_feats, **f32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_y, pos_x = y[:, None] / dim_t, x[:, None] / dim_t  # [H, F], [W, F]
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat(
        (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)),
        dim=2,
    )
    return pos.permute(2, 0, 1)[None].to(dtype)
