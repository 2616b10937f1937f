"""A pixel decoder of ``SEM_SEG_HEADS_REGISTRY`` serving as a method's feature neck.

K-Net's stage-0 head reads a list of same-width maps, finest first (its FPN neck gives P2..P5).
:class:`PixelDecoderNeck` turns any registered pixel decoder into such a neck, so that
``MODEL.KNET.NECK`` can name the deformable-attention pixel decoder
(``QSMSDeformAttnPixelDecoder``, ``common.modeling.pixel_decoder``) or FastInst's PPM-FPN
(``PyramidPoolingModuleFPN`` / ``BaseFPN``, ``common.modeling.ppm_fpn``) instead of K-Net's FPN.
The decoder is built from its own keys (``MODEL.SEM_SEG_HEAD.*``, and
``MODEL.MSDA_PIXEL_DECODER.*``) and must declare ``output_strides``:
``(stride of its mask features or None, strides of its multi-scale maps, coarsest first)``.
The neck's levels are the multi-scale maps finest first, preceded by the mask features when
those are finer than every map (the deformable-attention decoder: stride 4, then 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Sequence

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

__all__ = ["PixelDecoderNeck"]


class PixelDecoderNeck(nn.Module):
    """``forward(list of backbone maps named in_features) -> list of levels, finest first``."""

    def __init__(self, decoder: nn.Module, in_features: Sequence[str]):
        super().__init__()
        if not hasattr(decoder, "output_strides"):
            raise TypeError(
                f"pixel decoder {type(decoder).__name__} declares no output_strides: it cannot "
                "serve as a neck (see common.modeling.neck)"
            )
        self.decoder = decoder
        self.in_features = list(in_features)
        mask_stride, strides = decoder.output_strides
        self.with_mask_features = mask_stride is not None and mask_stride < min(strides)
        #: strides of the levels :meth:`forward` returns, finest first
        self.strides = ([mask_stride] if self.with_mask_features else []) + sorted(strides)

    @classmethod
    def build(
        cls, cfg: CfgNode, name: str, input_shape: dict[str, ShapeSpec], key: str
    ) -> PixelDecoderNeck:
        """Build the pixel decoder ``name`` (``key`` names the config key that chose it, for
        errors) on the backbone maps ``input_shape`` (those the method passes, finest first)."""
        if name not in SEM_SEG_HEADS_REGISTRY:
            known = sorted(k for k, _ in SEM_SEG_HEADS_REGISTRY)
            raise ValueError(f"{key}={name!r} is not a registered pixel decoder ({known})")
        wanted = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
        missing = [f for f in wanted if f not in input_shape]
        if missing:
            raise ValueError(
                f"{key}={name!r} reads MODEL.SEM_SEG_HEAD.IN_FEATURES {wanted}, but {missing} "
                f"are not among the maps it is given {sorted(input_shape)}"
            )
        decoder = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
        return cls(decoder, list(input_shape))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        out = self.decoder.forward_features(dict(zip(self.in_features, features)))
        levels = list(reversed(out[-1]))  # finest first
        if self.with_mask_features:
            levels.insert(0, out[0])
        return levels
