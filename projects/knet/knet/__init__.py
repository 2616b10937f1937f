"""K-Net (NeurIPS 2021) for Detectron2: instance, panoptic and semantic segmentation.

Importing the package registers the meta-architectures ``KNet`` and ``KNetSemantic``
and K-Net's loss terms in the shared criterion registry.
"""

import common.modeling  # noqa: F401  (registers the ResNet-vd (R-50-D8) and Swin backbones)

from . import losses  # noqa: F401  (registers K-Net's loss terms)
from .config import add_knet_config, finalize_knet_config
from .knet import KNet
from .knet_semantic import KNetSemantic

__all__ = ["add_knet_config", "finalize_knet_config", "KNet", "KNetSemantic"]
