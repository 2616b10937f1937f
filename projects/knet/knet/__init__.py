"""K-Net (NeurIPS 2021) for Detectron2: instance, panoptic and semantic segmentation.

Importing the package registers the meta-architectures ``KNet`` and ``KNetSemantic``, the
backbone ``build_knet_fpn_backbone`` and K-Net's loss terms in the shared criterion registry.
"""

from . import backbone, losses  # noqa: F401  (registrations)
from .config import add_knet_config
from .knet import KNet
from .knet_semantic import KNetSemantic

__all__ = ["add_knet_config", "KNet", "KNetSemantic"]
