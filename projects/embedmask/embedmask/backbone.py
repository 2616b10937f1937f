"""ResNet-FPN backbone with P6/P7 from P5, as FCOS and EmbedMask use it.

Provenance: AdelaiDet's ``build_fcos_resnet_fpn_backbone`` (FCOS ``USE_C5 False``); same module
names (``bottom_up``, ``fpn_lateral{3,4,5}``, ``fpn_output{3,4,5}``, ``top_block.p6/p7``).
Differs only in reading the number of top levels from ``MODEL.FCOS.TOP_LEVELS`` (0 or 2).
"""

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNet + FPN on ``MODEL.FPN.IN_FEATURES`` (res3-res5) + P6/P7 computed from P5.

    Returns:
        A detectron2 :class:`FPN` whose outputs are ``p3``..``p7`` (strides 8..128), each
        [B, MODEL.FPN.OUT_CHANNELS, H/s, W/s].
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_levels = cfg.MODEL.FCOS.TOP_LEVELS
    if top_levels == 2:
        top_block = LastLevelP6P7(out_channels, out_channels, in_feature="p5")
    elif top_levels == 0:
        top_block = None
    else:
        raise ValueError(f"MODEL.FCOS.TOP_LEVELS must be 0 or 2, got {top_levels}")
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
