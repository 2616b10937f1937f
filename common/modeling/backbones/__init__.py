"""Backbones registered in Detectron2's ``BACKBONE_REGISTRY``.

- ``build_resnet_vd_backbone``: ResNet-vd / V1c / dilated (D8) / DCN variants (``resnet_vd``).
- ``build_swin_backbone``, ``build_swin_fpn_backbone``: timm Swin-T/S/B/L (``swin``).

Detectron2's own ``build_resnet_backbone``/``build_resnet_fpn_backbone`` with
``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` work once ``common.ops`` is imported (see
``common.ops.deform_conv.patch_detectron2``).
"""

from .resnet_vd import AvgDownConv2d, DeepStem, ResNetVd, build_resnet_vd_backbone, make_resnet_vd
from .swin import SwinBackbone, build_swin_backbone, build_swin_fpn_backbone

__all__ = [
    "AvgDownConv2d",
    "DeepStem",
    "ResNetVd",
    "build_resnet_vd_backbone",
    "make_resnet_vd",
    "SwinBackbone",
    "build_swin_backbone",
    "build_swin_fpn_backbone",
]
