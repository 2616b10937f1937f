"""EmbedMask (one-stage instance segmentation by coupling pixel and proposal embeddings) on FCOS.

Importing the package registers the ``EmbedMask`` meta-architecture and the
``build_fcos_resnet_fpn_backbone`` backbone.
"""

from . import backbone  # noqa: F401  (registers build_fcos_resnet_fpn_backbone)
from .config import add_embedmask_config, add_fcos_config, finalize_embedmask_config
from .embed_head import EmbedMaskHead, mask_log_probability
from .embedmask import EmbedMask
from .fcos import FCOS, FCOSHead
from .mask_loss import EmbedMaskLoss

__all__ = [
    "add_embedmask_config",
    "add_fcos_config",
    "finalize_embedmask_config",
    "EmbedMask",
    "EmbedMaskHead",
    "EmbedMaskLoss",
    "FCOS",
    "FCOSHead",
    "mask_log_probability",
]
