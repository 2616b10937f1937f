"""Base decode heads of the semantic K-Net: FCN, PSPNet, DeepLabV3 (ASPP) and UPerNet.

Each returns the stage-0 logits, the feature map the kernel update heads read and the class
kernels (the classifier's weight, one kernel per class), as the official ``*KernelHead`` s.

Provenance: re-implements mmseg's ``FCNHead``/``PSPHead``/``ASPPHead``/``UPerHead`` (v0.18-0.30;
the K-Net repo subclasses them in ``knet/seg/seg_kernel_head.py``) with Detectron2 layers; same
layer shapes and order, conv+norm+ReLU blocks named ``conv``/``norm`` instead of ``conv``/``bn``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from detectron2.layers import Conv2d, get_norm
from torch import Tensor, nn
from torch.nn import functional as F

from common.modeling.export import TraceableAdaptiveAvgPool2d

__all__ = ["FCNHead", "PSPHead", "ASPPHead", "UPerHead", "build_decode_head"]


def conv_module(
    in_channels: int, out_channels: int, kernel_size: int, norm: str, dilation: int = 1
) -> Conv2d:
    """mmcv ``ConvModule`` (conv without bias when normalized -> norm -> ReLU), kaiming init."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        padding=0 if kernel_size == 1 else dilation * (kernel_size // 2),
        dilation=dilation,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=nn.ReLU(inplace=True),
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _KernelDecodeHead(nn.Module):
    """Shared classifier part: Dropout2d -> ``conv_seg`` (1x1, bias), normal(0.01) init."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def features(self, inputs: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            inputs: the backbone maps named by the head's ``in_features``.

        Returns:
            logits [B, num_classes, h, w], feats [B, channels, h, w] (the map before the
            classifier) and kernels [B, num_classes, channels, 1, 1] (``conv_seg.weight``).
        """
        feats = self.features(inputs)
        logits = self.conv_seg(self.dropout(feats))
        kernels = self.conv_seg.weight[None].expand(feats.shape[0], -1, -1, -1, -1)
        return logits, feats, kernels


class FCNHead(_KernelDecodeHead):
    """FCN: ``num_convs`` 3x3 convs (+ a 3x3 ``conv_cat`` over [input, convs] if
    ``concat_input``) on one map."""

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_convs: int = 2,
        concat_input: bool = True,
        norm: str = "BN",
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        convs = [
            conv_module(in_channels if i == 0 else channels, channels, 3, norm)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = (
            conv_module(in_channels + channels, channels, 3, norm) if concat_input else None
        )

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        feats = self.convs(x)
        if self.conv_cat is not None:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return feats


class PyramidPooling(nn.ModuleList):
    """PSPNet's pooling pyramid: adaptive average pool to each scale -> 1x1 conv module ->
    bilinear back to the input size. Returns the list of pooled maps."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, norm: str):
        super().__init__(
            nn.Sequential(
                TraceableAdaptiveAvgPool2d(s), conv_module(in_channels, channels, 1, norm)
            )
            for s in pool_scales
        )

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [_resize(m(x), x.shape[-2:]) for m in self]


class PSPHead(_KernelDecodeHead):
    """PSPNet: [x, pyramid pooling(x)] -> 3x3 ``bottleneck``."""

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "BN",
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = PyramidPooling(pool_scales, in_channels, channels, norm)
        self.bottleneck = conv_module(in_channels + len(pool_scales) * channels, channels, 3, norm)

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))


class ASPPHead(_KernelDecodeHead):
    """DeepLabV3: [image pooling, 1x1 / dilated 3x3 branches] -> 3x3 ``bottleneck``."""

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        num_classes: int,
        dilations: Sequence[int] = (1, 12, 24, 36),
        norm: str = "BN",
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv_module(in_channels, channels, 1, norm)
        )
        self.aspp_modules = nn.ModuleList(
            conv_module(in_channels, channels, 1 if d == 1 else 3, norm, dilation=d)
            for d in dilations
        )
        self.bottleneck = conv_module((len(dilations) + 1) * channels, channels, 3, norm)

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        outs = [_resize(self.image_pool(x), x.shape[-2:])]
        outs += [m(x) for m in self.aspp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))


class UPerHead(_KernelDecodeHead):
    """UPerNet: PPM on the coarsest map, FPN top-down path, all levels fused at the finest."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "BN",
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = PyramidPooling(pool_scales, in_channels[-1], channels, norm)
        self.bottleneck = conv_module(
            in_channels[-1] + len(pool_scales) * channels, channels, 3, norm
        )
        self.lateral_convs = nn.ModuleList(
            conv_module(c, channels, 1, norm) for c in in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            conv_module(channels, channels, 3, norm) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = conv_module(len(in_channels) * channels, channels, 3, norm)

    def features(self, inputs: list[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        top = inputs[-1]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [_resize(x, outs[0].shape[-2:]) for x in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))


def build_decode_head(
    name: str,
    *,
    in_channels: Sequence[int],
    channels: int,
    num_classes: int,
    norm: str,
    dropout: float,
    fcn_num_convs: int = 2,
    fcn_concat_input: bool = True,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    aspp_dilations: Sequence[int] = (1, 12, 24, 36),
) -> _KernelDecodeHead:
    """Build the decode head named ``name`` ("FCN" | "PSP" | "ASPP" | "UPER")."""
    kw = {"channels": channels, "num_classes": num_classes, "norm": norm, "dropout": dropout}
    key = name.upper()
    if key == "UPER":
        return UPerHead(in_channels=in_channels, pool_scales=pool_scales, **kw)
    if len(in_channels) != 1:
        raise ValueError(f"decode head {name} reads one feature map, got {len(in_channels)}")
    if key == "FCN":
        return FCNHead(
            in_channels=in_channels[0],
            num_convs=fcn_num_convs,
            concat_input=fcn_concat_input,
            **kw,
        )
    if key == "PSP":
        return PSPHead(in_channels=in_channels[0], pool_scales=pool_scales, **kw)
    if key == "ASPP":
        return ASPPHead(in_channels=in_channels[0], dilations=aspp_dilations, **kw)
    raise KeyError(f"MODEL.KNET.SEMANTIC.DECODE_HEAD={name!r}: expected FCN, PSP, ASPP or UPER")
