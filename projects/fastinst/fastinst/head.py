"""``FastInstHead``: pixel decoder (PPM-FPN by default) + FastInst transformer decoder.

The pixel decoders (``PyramidPoolingModuleFPN``, ``BaseFPN``) are shared with K-Net's neck and
live in ``common.modeling.ppm_fpn``.

Provenance: the official ``FastInstHead`` (``sem_seg_head.pixel_decoder`` / ``.predictor`` keep the
released checkpoint's key prefixes); differences: it also accepts pixel decoders that return
Mask2Former's three-tuple (mask features, encoder features, multi-scale maps), checks the channel
width, and receives the matcher as an argument for GT-mask-guided learning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from common.modeling import ppm_fpn as _ppm_fpn  # noqa: F401  (registers the default decoders)
from common.modeling.meta_arch import num_classes

from .decoder import FastInstDecoder

__all__ = ["FastInstHead", "build_pixel_decoder"]


def build_pixel_decoder(cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    """Build ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` from ``SEM_SEG_HEADS_REGISTRY``.

    The module must have ``forward_features(features)`` returning a tuple whose last item is the
    list of multi-scale maps, coarsest first, ending with strides 16 and 8 (the PPM-FPN / FPN of
    ``common.modeling.ppm_fpn`` and the deformable-attention decoder of
    ``common.modeling.pixel_decoder`` all do).
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in SEM_SEG_HEADS_REGISTRY:
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} is not registered in "
            "SEM_SEG_HEADS_REGISTRY (common provides 'PyramidPoolingModuleFPN', 'BaseFPN' and "
            "'QSMSDeformAttnPixelDecoder')"
        )
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise TypeError(f"pixel decoder {name!r} has no forward_features(features) method")
    return model


@SEM_SEG_HEADS_REGISTRY.register()
class FastInstHead(nn.Module):
    """Runs the pixel decoder, takes E4 (stride 16) and E3 (stride 8), runs the decoder."""

    @configurable
    def __init__(self, *, num_classes: int, pixel_decoder: nn.Module, predictor: FastInstDecoder):
        """
        Args:
            num_classes: C foreground classes.
            pixel_decoder: module with ``forward_features(features)`` whose last returned item is
                the multi-scale list ending with the stride-16 and stride-8 maps.
            predictor: the :class:`FastInstDecoder`.
        """
        super().__init__()
        self.num_classes = num_classes
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        head = cfg.MODEL.SEM_SEG_HEAD
        if head.CONVS_DIM != cfg.MODEL.FASTINST.HIDDEN_DIM:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.CONVS_DIM ({head.CONVS_DIM}) must equal "
                f"MODEL.FASTINST.HIDDEN_DIM ({cfg.MODEL.FASTINST.HIDDEN_DIM}): the decoder reads "
                "the pixel decoder's maps directly"
            )
        return {
            "num_classes": num_classes(cfg),
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "predictor": FastInstDecoder(cfg),
        }

    def multi_scale_features(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Backbone features -> (E4 [B, D, H/16, W/16], E3 [B, D, H/8, W/8])."""
        outputs = self.pixel_decoder.forward_features(features)
        maps = outputs[-1]
        if len(maps) < 2:
            raise ValueError("the pixel decoder must return at least the stride-16 and -8 maps")
        e4, e3 = maps[-2], maps[-1]
        if self.training:
            # Outputs FastInst does not read (e.g. a Mask2Former decoder's mask_features) join
            # the graph with weight 0, so DDP needs no find_unused_parameters.
            for extra in outputs[:-1]:
                if isinstance(extra, Tensor) and extra.requires_grad:
                    e3 = e3 + 0.0 * extra.mean()
        return e4, e3

    def forward(
        self,
        features: dict[str, Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
        matcher: Callable | None = None,
    ) -> dict[str, Any]:
        """
        Args:
            features: backbone maps (res3..res5).
            targets, matcher: for GT-mask-guided learning (training only).
        Returns:
            the decoder's prediction dict (see :meth:`FastInstDecoder.forward`).
        """
        proposal_features, pixel_features = self.multi_scale_features(features)
        return self.predictor(proposal_features, pixel_features, targets, matcher)
