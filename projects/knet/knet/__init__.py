"""K-Net (NeurIPS 2021) for Detectron2: instance, panoptic and semantic segmentation.

Importing the package registers the meta-architectures ``KNet`` and ``KNetSemantic``
and K-Net's loss terms in the shared criterion registry.
"""

try:  # registers the ResNet-vd (R-50-D8) and Swin backbones and DeformConv the configs use
    import common.ops  # noqa: F401
except ImportError:  # common.ops absent: only the Detectron2 ResNet configs work
    pass

from . import losses  # noqa: F401  (registers K-Net's loss terms)
from .config import add_knet_config
from .knet import KNet
from .knet_semantic import KNetSemantic

__all__ = ["add_knet_config", "KNet", "KNetSemantic"]
