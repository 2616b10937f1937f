"""K-Net's stage-0 kernel head (official ``ConvKernelHead``, the "rpn_head").

Provenance: follows ``knet/det/kernel_head.py`` (ZwwWayne/K-Net @5e50ee5) with the released
settings (semantic FPN neck, one loc and one seg conv, no feature refinement, binary masks for
the object-feature term of the initial kernels). The panoptic stuff kernels (rows of the
semantic classifier) are appended by :meth:`ConvKernelHead.with_stuff_kernels`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .semantic_fpn import SemanticFPN, conv_norm_relu


class ConvKernelHead(nn.Module):
    """Semantic-FPN neck -> localization / semantic features -> N learned kernels (stage 0).

    The initial kernel of proposal i is ``init_kernels.weight[i]`` plus the sum of the
    feature map over its binary initial mask ``sigmoid(mask_i) > 0.5``.
    """

    def __init__(
        self,
        *,
        num_proposals: int = 100,
        num_classes: int = 80,
        num_levels: int = 4,
        in_channels: int = 256,
        channels: int = 256,
        conv_kernel_size: int = 1,
        neck_out_level: int = 1,
        pos_encoding_level: int = 3,
        norm: str = "GN",
        kernel_init_std: float = 1.0,
    ):
        """
        Args:
            num_proposals: N, the number of learned (thing) kernels.
            num_classes: channels of the semantic classifier ``conv_seg`` (80 instance,
                133 panoptic: things then stuff).
            num_levels, in_channels, neck_out_level, pos_encoding_level, norm: the
                :class:`SemanticFPN` neck.
            channels: C, the width of the features and kernels.
            conv_kernel_size: K, the spatial size of the kernels.
            kernel_init_std: std of the normal init of ``init_kernels``.
        """
        super().__init__()
        self.num_proposals = num_proposals
        self.num_classes = num_classes
        self.channels = channels
        self.conv_kernel_size = conv_kernel_size
        self.localization_fpn = SemanticFPN(
            num_levels=num_levels,
            in_channels=in_channels,
            feat_channels=channels,
            out_channels=channels,
            out_level=neck_out_level,
            pos_encoding_level=pos_encoding_level,
            norm=norm,
        )
        self.loc_convs = nn.Sequential(conv_norm_relu(channels, channels, 1, norm=norm))
        self.seg_convs = nn.Sequential(conv_norm_relu(channels, channels, 1, norm=norm))
        k = conv_kernel_size
        self.init_kernels = nn.Conv2d(channels, num_proposals, k, padding=k // 2, bias=False)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        for m in (*self.loc_convs.modules(), *self.seg_convs.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.constant_(self.conv_seg.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.normal_(self.init_kernels.weight, std=kernel_init_std)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """
        Args:
            features: FPN maps P2..P5 [B, C_in, H/4..H/32, W/4..W/32] (H, W padded to 32).

        Returns:
            dict with
            - ``x_feats`` [B, C, H/8, W/8]: loc + sem features, read by every update stage;
            - ``kernels`` [B, N, C, K, K]: the initial kernels;
            - ``mask_logits`` [B, N, H/8, W/8]: the initial masks;
            - ``seg_logits`` [B, num_classes, H/8, W/8]: the semantic (sigmoid) predictions.
        """
        loc, sem = self.localization_fpn(features)
        loc = self.loc_convs(loc)
        sem = self.seg_convs(sem)
        mask_logits = self.init_kernels(loc)
        seg_logits = self.conv_seg(sem)
        x_feats = sem + loc
        b = x_feats.shape[0]
        binary = (mask_logits.sigmoid() > 0.5).to(x_feats.dtype)
        obj_feats = torch.einsum("bnhw,bchw->bnc", binary, x_feats)
        kernels = self.init_kernels.weight[None].expand(b, -1, -1, -1, -1)
        kernels = kernels + obj_feats[..., None, None]
        return {
            "x_feats": x_feats,
            "kernels": kernels,
            "mask_logits": mask_logits,
            "seg_logits": seg_logits,
        }

    def with_stuff_kernels(
        self, stage0: dict[str, Tensor], num_thing_classes: int
    ) -> tuple[Tensor, Tensor]:
        """Panoptic: append one kernel per stuff class (rows ``num_thing_classes:`` of
        ``conv_seg``) and its semantic logits as the initial mask.

        Returns:
            kernels [B, N + S, C, K, K] and mask_logits [B, N + S, H/8, W/8], S = stuff classes.
        """
        b = stage0["kernels"].shape[0]
        stuff = self.conv_seg.weight[num_thing_classes:]  # [S, C, 1, 1]
        k = self.conv_kernel_size
        if k != 1:
            raise ValueError("panoptic stuff kernels need conv_kernel_size == 1")
        kernels = torch.cat([stage0["kernels"], stuff[None].expand(b, -1, -1, -1, -1)], dim=1)
        masks = torch.cat(
            [stage0["mask_logits"], stage0["seg_logits"][:, num_thing_classes:]], dim=1
        )
        return kernels, masks
