"""The K-Net detection backbone: any bottom-up network + an FPN with exactly P2..P5.

Provenance: mmdet ``FPN(num_outs=4, start_level=0)`` as the official configs use it; built with
Detectron2's :class:`~detectron2.modeling.FPN` (same lateral 1x1 / output 3x3 convs with bias and
nearest upsampling; its c2-xavier init differs from mmdet's xavier-uniform).
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone


@BACKBONE_REGISTRY.register()
def build_knet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """FPN without extra levels on the bottom-up network named by ``MODEL.KNET.BOTTOM_UP``.

    Returns:
        a Backbone with outputs ``p2``..``p5`` (for ``MODEL.FPN.IN_FEATURES`` res2..res5),
        ``MODEL.FPN.OUT_CHANNELS`` channels each, size divisibility 32.
    """
    name = cfg.MODEL.KNET.BOTTOM_UP
    if name not in BACKBONE_REGISTRY:
        raise KeyError(
            f"MODEL.KNET.BOTTOM_UP={name!r} is not a registered backbone "
            "(the Swin/ResNet-vd builders are registered by `import common.ops`)"
        )
    bottom_up = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=None,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
