"""PPM-FPN pixel decoder (FastInst, He et al., CVPR 2023, Sec. 3.1) and its plain-FPN ablation.

``PyramidPoolingModuleFPN`` and ``BaseFPN`` (``SEM_SEG_HEADS_REGISTRY``) take res3-res5 and return
E5, E4, E3 (strides 32, 16, 8, ``MODEL.SEM_SEG_HEAD.CONVS_DIM`` channels each); there is no
mask-feature conv (FastInst's transformer decoder projects E3 itself). They are FastInst's pixel
decoder (``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``) and, through ``output_strides``, one of K-Net's
necks (``MODEL.KNET.NECK``, see ``common.modeling.neck``); the deformable-attention alternative
is ``common.modeling.pixel_decoder``.

Provenance: the official FastInst ``PyramidPoolingModuleFPN``/``BaseFPN`` (lateral 1x1 + output
3x3, GN, c2-xavier init, top-down sum of the coarser level's *output*, PSP pooling 1/2/3/6 on the
coarsest lateral) with the same module names (``adapter_i``, ``layer_i``, ``ppm.stages``,
``ppm.bottleneck``); the difference is that ``forward`` returns the features too (the official
one logs a warning).
"""

from __future__ import annotations

from collections.abc import Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn
from torch.nn import functional as F

from common.modeling.export import TraceableAdaptiveAvgPool2d

__all__ = ["BaseFPN", "PyramidPoolingModuleFPN", "PyramidPoolingModule"]


class PyramidPoolingModule(nn.Module):
    """PSPNet pyramid pooling: pool to s x s (s in ``sizes``), 1x1 conv + ReLU, upsample, concat
    with the input, 1x1 conv + ReLU back to ``in_channels``.

    Args:
        in_channels: C of the input map.
        channels: output channels of each pooling branch (FastInst: C / 4).
    """

    def __init__(self, in_channels: int, channels: int, sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                TraceableAdaptiveAvgPool2d(s), Conv2d(in_channels, channels, kernel_size=1)
            )
            for s in sizes
        )
        self.bottleneck = Conv2d(in_channels + len(sizes) * channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        size = x.shape[-2:]
        priors = [
            F.interpolate(F.relu(stage(x)), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return F.relu(self.bottleneck(torch.cat([*priors, x], dim=1)))


@SEM_SEG_HEADS_REGISTRY.register()
class BaseFPN(nn.Module):
    """FPN over res3-res5 returning [E5, E4, E3] (no pyramid pooling; an ablation of PPM-FPN)."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        convs_dim: int = 256,
        norm: str = "GN",
    ):
        """
        Args:
            input_shape: backbone features to use (name -> ShapeSpec), e.g. res3, res4, res5.
            convs_dim: output channels of every level.
            norm: detectron2 norm name for the convs ("" = no norm, convs get a bias).
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]
        self.convs_dim = convs_dim
        # (no mask_features, strides of the outputs coarse -> fine), for
        # common.modeling.neck.PixelDecoderNeck (this FPN as another method's neck)
        self.output_strides = (None, [v.stride for _, v in reversed(shapes)])
        use_bias = norm == ""
        # index 1 = highest resolution (official naming); kept in coarse-to-fine lists too
        for idx, (_, shape) in enumerate(shapes, start=1):
            adapter = Conv2d(
                shape.channels,
                convs_dim,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, convs_dim),
            )
            layer = Conv2d(
                convs_dim,
                convs_dim,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, convs_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(adapter)
            weight_init.c2_xavier_fill(layer)
            self.add_module(f"adapter_{idx}", adapter)
            self.add_module(f"layer_{idx}", layer)
        n = len(shapes)
        self._coarse_to_fine = [(f"adapter_{i}", f"layer_{i}") for i in range(n, 0, -1)]

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "convs_dim": head.CONVS_DIM,
            "norm": head.NORM,
        }

    def coarsest_lateral(self, x: Tensor) -> Tensor:
        """Hook for the top level (identity here, pyramid pooling in PPM-FPN)."""
        return x

    def forward_features(self, features: dict[str, Tensor]) -> tuple[None, list[Tensor]]:
        """
        Args:
            features: backbone maps, e.g. res3 [B, C3, H/8, W/8] ... res5 [B, C5, H/32, W/32].
        Returns:
            (None, [E5, E4, E3]): no mask features; maps [B, convs_dim, H/s, W/s], coarsest first.
        """
        outs: list[Tensor] = []
        y = None
        for name, (adapter, layer) in zip(self.in_features[::-1], self._coarse_to_fine):
            lateral = getattr(self, adapter)(features[name])
            if y is None:
                y = self.coarsest_lateral(lateral)
            else:
                y = lateral + F.interpolate(
                    y, size=lateral.shape[-2:], mode="bilinear", align_corners=False
                )
            y = getattr(self, layer)(y)
            outs.append(y)
        return None, outs

    def forward(self, features: dict[str, Tensor]) -> tuple[None, list[Tensor]]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)


@SEM_SEG_HEADS_REGISTRY.register()
class PyramidPoolingModuleFPN(BaseFPN):
    """FastInst's PPM-FPN: :class:`BaseFPN` with pyramid pooling on the coarsest lateral output."""

    @configurable
    def __init__(
        self, input_shape: dict[str, ShapeSpec], *, convs_dim: int = 256, norm: str = "GN"
    ):
        """Args: as :class:`BaseFPN`."""
        super().__init__(input_shape, convs_dim=convs_dim, norm=norm)
        self.ppm = PyramidPoolingModule(convs_dim, convs_dim // 4)

    def coarsest_lateral(self, x: Tensor) -> Tensor:
        return self.ppm(x)
