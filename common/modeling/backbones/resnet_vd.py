"""ResNet with "Bag of Tricks" variants (He et al., CVPR 2019), dilation and DCN, for Detectron2.

One builder, ``build_resnet_vd_backbone``, covers:

- R50-d / R50-vd (FastInst, SparseInst): ``DEEP_STEM`` (three 3x3 convs, 32-32-64) and
  ``AVG_DOWN`` (the strided projection shortcut is AvgPool(stride) + 1x1 conv).
- R50-d-DCN: the above plus ``DEFORM_ON_PER_STAGE`` = [False, False, True, True] (DCNv1 in the
  3x3 conv of every res4/res5 bottleneck, offsets from a zero-initialised 3x3 conv).
- K-Net's semantic R-50-D8 (mmseg ``ResNetV1c`` with dilations (1, 1, 2, 4) and strides
  (1, 2, 1, 1)): ``DEEP_STEM``, ``RES4_DILATION`` 2, ``RES5_DILATION`` 4, ``CONTRACT_DILATION``
  (first block of a dilated stage uses half the dilation, as mmseg's configs do); output stride 8.

Blocks are Detectron2's ``BottleneckBlock``/``DeformBottleneckBlock``, so parameter names follow
Detectron2 (``stem.conv{1,2,3}``, ``res{2..5}.{i}.conv{1,2,3}``, ``shortcut``, ``conv2_offset``);
``convert_resnet_weights`` renames timm (``resnet50d``), torchvision and mmcv/mmseg
(``resnet50_v1c``, mmdet DCN) ResNet state dicts to these names. Unlike FastInst's copy,
``size_divisibility`` is a property (the largest output stride).
"""

from __future__ import annotations

from collections.abc import Mapping

import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import (
    BasicStem,
    BottleneckBlock,
    DeformBottleneckBlock,
    ResNet,
)
from torch import Tensor

from common.convert.core import convert_state_dict
from common.convert.rules import resnet_layout, resnet_rules, strip_wrappers

__all__ = [
    "DeepStem",
    "AvgDownConv2d",
    "ResNetVd",
    "make_resnet_vd",
    "build_resnet_vd_backbone",
    "convert_resnet_weights",
]

_BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class DeepStem(CNNBlockBase):
    """ResNet-C stem: 3x3 convs (C/2, stride 2), (C/2), (C), each with norm + ReLU; 3x3 max-pool."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN") -> None:
        """
        Args:
            in_channels: image channels.
            out_channels: stem output channels C (the first two convs have C / 2).
            norm: normalisation name for ``detectron2.layers.get_norm``.
        """
        super().__init__(in_channels, out_channels, 4)
        mid = out_channels // 2
        widths = [(in_channels, mid, 2), (mid, mid, 1), (mid, out_channels, 1)]
        for i, (cin, cout, stride) in enumerate(widths, start=1):
            conv = Conv2d(
                cin, cout, 3, stride=stride, padding=1, bias=False, norm=get_norm(norm, cout)
            )
            weight_init.c2_msra_fill(conv)
            self.add_module(f"conv{i}", conv)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C, ceil(H / 4), ceil(W / 4))."""
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu_(conv(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class AvgDownConv2d(Conv2d):
    """ResNet-D projection shortcut: AvgPool(stride, ceil_mode, count_include_pad=False), 1x1 conv.

    A ``detectron2.layers.Conv2d`` (parameters ``weight``, ``norm.*``) whose stride is moved into
    the pooling, so state-dict keys match a plain shortcut conv's.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, norm: str) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size=1, bias=False, norm=get_norm(norm, out_channels)
        )
        self.pool_stride = stride
        weight_init.c2_msra_fill(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        if self.pool_stride > 1:
            s = self.pool_stride
            x = F.avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False)
        return super().forward(x)


class ResNetVd(ResNet):
    """Detectron2 ``ResNet`` whose ``size_divisibility`` is its largest output stride."""

    @property
    def size_divisibility(self) -> int:
        return max(self._out_feature_strides[f] for f in self._out_features)


def make_resnet_vd(
    *,
    depth: int = 50,
    in_channels: int = 3,
    stem_out_channels: int = 64,
    res2_out_channels: int = 256,
    num_groups: int = 1,
    width_per_group: int = 64,
    norm: str = "FrozenBN",
    stride_in_1x1: bool = False,
    deep_stem: bool = True,
    avg_down: bool = True,
    dilations: tuple[int, int, int, int] = (1, 1, 1, 1),
    contract_dilation: bool = False,
    deform_on_per_stage: tuple[bool, bool, bool, bool] = (False, False, False, False),
    deform_modulated: bool = False,
    deform_num_groups: int = 1,
    out_features: tuple[str, ...] = ("res2", "res3", "res4", "res5"),
    freeze_at: int = 0,
) -> ResNetVd:
    """Build a bottleneck ResNet (50/101/152) with the vd/V1c/dilation/DCN options.

    Args:
        dilations: per stage res2..res5; a stage with dilation > 1 (res4/res5) has stride 1.
        contract_dilation: the first block of a dilated stage uses dilation / 2.
        deep_stem, avg_down: ResNet-C stem and ResNet-D shortcut.
        Others: as Detectron2's ``MODEL.RESNETS.*``.

    Returns:
        A ``ResNetVd``; output strides are 4, 8, 16, 32 divided by the dilations of the stages.
    """
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
    if dilations[0] != 1 or dilations[1] != 1:
        raise ValueError(f"only res4/res5 can be dilated, got dilations {dilations}")
    if dilations[2] > 1 and dilations[3] < dilations[2]:
        raise ValueError(f"res5 dilation must be >= res4 dilation, got {dilations}")
    stem_cls = DeepStem if deep_stem else BasicStem
    stem = stem_cls(in_channels=in_channels, out_channels=stem_out_channels, norm=norm)
    bottleneck = num_groups * width_per_group
    cin, cout = stem_out_channels, res2_out_channels
    stages = []
    for idx, n in enumerate(_BLOCKS_PER_STAGE[depth]):
        dilation = dilations[idx]
        stride = 1 if idx == 0 or dilation > 1 else 2
        first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
        kwargs = {
            "bottleneck_channels": bottleneck,
            "num_groups": num_groups,
            "norm": norm,
            "stride_in_1x1": stride_in_1x1,
            "stride_per_block": [stride] + [1] * (n - 1),
            "dilation_per_block": [first_dilation] + [dilation] * (n - 1),
        }
        if deform_on_per_stage[idx]:
            block_cls = DeformBottleneckBlock
            kwargs.update(deform_modulated=deform_modulated, deform_num_groups=deform_num_groups)
        else:
            block_cls = BottleneckBlock
        blocks = ResNet.make_stage(block_cls, n, in_channels=cin, out_channels=cout, **kwargs)
        if avg_down and stride > 1 and blocks[0].shortcut is not None:
            blocks[0].shortcut = AvgDownConv2d(cin, cout, stride=stride, norm=norm)
        stages.append(blocks)
        cin, cout, bottleneck = cout, cout * 2, bottleneck * 2
    return ResNetVd(stem, stages, out_features=list(out_features), freeze_at=freeze_at)


@BACKBONE_REGISTRY.register()
def build_resnet_vd_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNetVd:
    """``MODEL.BACKBONE.NAME: build_resnet_vd_backbone``: reads ``MODEL.RESNETS.*``.

    Detectron2's keys (DEPTH, NORM, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, NUM_GROUPS,
    WIDTH_PER_GROUP, STRIDE_IN_1X1, RES5_DILATION, DEFORM_*, OUT_FEATURES, BACKBONE.FREEZE_AT)
    plus ``common.engine.model_defaults``'s DEEP_STEM, AVG_DOWN, RES4_DILATION, CONTRACT_DILATION.
    """
    r = cfg.MODEL.RESNETS
    return make_resnet_vd(
        depth=r.DEPTH,
        in_channels=input_shape.channels,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        norm=r.NORM,
        stride_in_1x1=r.STRIDE_IN_1X1,
        deep_stem=r.DEEP_STEM,
        avg_down=r.AVG_DOWN,
        dilations=(1, 1, r.RES4_DILATION, r.RES5_DILATION),
        contract_dilation=r.CONTRACT_DILATION,
        deform_on_per_stage=tuple(r.DEFORM_ON_PER_STAGE),
        deform_modulated=r.DEFORM_MODULATED,
        deform_num_groups=r.DEFORM_NUM_GROUPS,
        out_features=tuple(r.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


def convert_resnet_weights(state_dict: Mapping[str, object]) -> dict[str, object]:
    """Rename a timm / torchvision / mmcv ResNet state dict to Detectron2's ResNet names.

    Handles the deep stem (timm ``conv1.{0,1,3,4,6}`` + ``bn1``, mmcv ``stem.{0,1,3,4,6,7}``),
    ``bn{k}`` -> ``conv{k}.norm``, the shortcut (``downsample.{0,1}`` or, with avg-down,
    ``downsample.{1,2}``) -> ``shortcut``/``shortcut.norm``, and DCN offsets
    (``conv2_offset`` or mmcv's ``conv2.conv_offset``) -> ``conv2_offset``. Drops ``fc.*``.
    A leading ``module.``, ``backbone.`` or ``state_dict``/``model`` wrapper is removed. The
    rules are ``common.convert.rules.resnet_rules`` (also used by ``tools/convert_backbone.py``).

    Args:
        state_dict: {name: tensor}, possibly wrapped as {"state_dict": ...} or {"model": ...}.

    Returns:
        {Detectron2 name (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ...): tensor},
        without a ``backbone.`` prefix.

    Raises:
        KeyError: listing the keys no rule maps.
    """
    sd = strip_wrappers(state_dict)
    out, report = convert_state_dict(sd, resnet_rules(**resnet_layout(sd)))
    if report.unmapped:
        raise KeyError(f"unexpected ResNet keys {report.unmapped}")
    return out
