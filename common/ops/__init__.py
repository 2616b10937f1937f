"""QuerySeg's shared ops: deformable attention and convolution, backbones, pixel decoder.

Importing this package:

- makes Detectron2's ResNet use ``common.ops.deform_conv``'s ``DeformConv``/``ModulatedDeformConv``
  (``deform_conv.patch_detectron2``), so ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` works without
  Detectron2's ``_C``;
- registers the backbones ``build_resnet_vd_backbone``, ``build_swin_backbone`` and
  ``build_swin_fpn_backbone`` (``BACKBONE_REGISTRY``) and the pixel decoder
  ``QSMSDeformAttnPixelDecoder`` (``SEM_SEG_HEADS_REGISTRY``).

The op itself is ``common.ops.ms_deform_attn.ms_deform_attn`` (not re-exported here, so that the
submodule name stays importable and patchable). Config keys: ``common.ops.config.add_ops_config``.
Compiled kernels: ``common.ops.build``.
The Detectron2-dependent parts are skipped when Detectron2 is not installed.
"""

import importlib.util

from .deform_conv import DeformConv, ModulatedDeformConv, deform_conv2d
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_pytorch

__all__ = [
    "DeformConv",
    "ModulatedDeformConv",
    "deform_conv2d",
    "MSDeformAttn",
    "ms_deform_attn_pytorch",
]

if importlib.util.find_spec("detectron2") is not None:
    from . import backbones, pixel_decoder  # noqa: F401  (registers builders)
    from .deform_conv import patch_detectron2

    patch_detectron2()
