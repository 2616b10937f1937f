"""Deformable convolution (DCNv1, Dai et al. 2017; DCNv2, Zhu et al. 2019) on torchvision's op.

``DeformConv`` and ``ModulatedDeformConv`` take the constructor arguments, forward signatures and
parameter names of ``detectron2.layers.DeformConv``/``ModulatedDeformConv`` (``weight``, ``bias``,
``norm``), so Detectron2's ``DeformBottleneckBlock`` builds with them and loads Detectron2-format
weights (``res3.0.conv2.weight``, ``res3.0.conv2_offset.weight``). They run on CPU and CUDA,
forward and backward, via ``torchvision.ops.deform_conv2d``, whose offset layout is Detectron2's:
(dy, dx) pairs per kernel tap, grouped by deformable group.

Differences from Detectron2's: no compiled ``_C`` needed; CPU backward and CPU DCNv2 work;
float16/bfloat16 inputs (e.g. under autocast) are computed in float32 and cast back to the input
dtype; ``DeformConv`` also accepts ``bias=True``.

``patch_detectron2()`` makes Detectron2's ResNet (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) use these
classes; ``common.ops`` calls it on import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d as _tv_deform_conv2d

__all__ = ["deform_conv2d", "DeformConv", "ModulatedDeformConv", "patch_detectron2"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution, AMP-safe: low-precision inputs are computed in float32.

    Args:
        x: (N, C_in, H, W).
        offset: (N, 2 * G * kh * kw, H_out, W_out), (dy, dx) per tap; G = deformable groups.
        weight: (C_out, C_in / groups, kh, kw); ``groups`` is C_in / weight.shape[1].
        bias: (C_out,) or None.
        stride, padding, dilation: as for ``nn.Conv2d``.
        mask: (N, G * kh * kw, H_out, W_out) modulation (DCNv2), or None (DCNv1).

    Returns:
        (N, C_out, H_out, W_out) in ``x``'s dtype.
    """
    tensors = [t for t in (x, offset, weight, bias, mask) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = _tv_deform_conv2d(
            x.to(dtype),
            offset.to(dtype),
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            stride=_pair(stride),
            padding=_pair(padding),
            dilation=_pair(dilation),
            mask=None if mask is None else mask.to(dtype),
        )
    return out.to(x.dtype)


class _DeformConvBase(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = False,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.with_bias = bias
        self.norm = norm
        self.activation = activation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def _out_size(self, x: Tensor) -> list[int]:
        return [
            (size + 2 * p - (d * (k - 1) + 1)) // s + 1
            for size, p, d, k, s in zip(
                x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        ]

    def _check(self, offset: Tensor, mask: Tensor | None) -> None:
        taps = self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]
        if offset.shape[1] != 2 * taps:
            raise ValueError(f"offset needs {2 * taps} channels, got {offset.shape[1]}")
        if mask is not None and mask.shape[1] != taps:
            raise ValueError(f"mask needs {taps} channels, got {mask.shape[1]}")

    def _conv(self, x: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        self._check(offset, mask)
        if x.numel() == 0:  # empty batch: right shape, still connected to the graph
            out = x.new_zeros([x.shape[0], self.out_channels, *self._out_size(x)])
            out = out + self.weight.sum() * 0
        else:
            out = deform_conv2d(
                x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
            )
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.with_bias}"
        )


class DeformConv(_DeformConvBase):
    """DCNv1, a drop-in for ``detectron2.layers.DeformConv`` (bias off by default)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = False,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """
        Args:
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as for
                ``nn.Conv2d``.
            deformable_groups: offset groups G; the offset has 2 * G * kh * kw channels.
            bias: learn a bias (Detectron2's DeformConv has none; its weights never carry one).
            norm: a normalisation module applied to the output, e.g. ``get_norm("BN", C)``.
            activation: a callable applied after ``norm``.
        """
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deformable_groups,
            bias,
            norm,
            activation,
        )

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        """
        Args:
            x: (N, C_in, H, W).
            offset: (N, 2 * G * kh * kw, H_out, W_out), (dy, dx) pairs per kernel tap.

        Returns:
            (N, C_out, H_out, W_out) in ``x``'s dtype.
        """
        return self._conv(x, offset, None)


class ModulatedDeformConv(_DeformConvBase):
    """DCNv2, a drop-in for ``detectron2.layers.ModulatedDeformConv`` (bias on by default)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = True,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Arguments as for ``DeformConv``; ``bias`` defaults to True as in Detectron2."""
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deformable_groups,
            bias,
            norm,
            activation,
        )

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """
        Args:
            x: (N, C_in, H, W).
            offset: (N, 2 * G * kh * kw, H_out, W_out), (dy, dx) pairs per kernel tap.
            mask: (N, G * kh * kw, H_out, W_out) modulation scalars (sigmoid outputs).

        Returns:
            (N, C_out, H_out, W_out) in ``x``'s dtype.
        """
        return self._conv(x, offset, mask)


def _is_placeholder(cls: type) -> bool:
    # detectron2 without _C defines DeformConv via create_dummy_class: not a module, raises on use.
    return not issubclass(cls, nn.Module)


def patch_detectron2() -> None:
    """Point Detectron2's ResNet at ``DeformConv``/``ModulatedDeformConv`` from this module.

    - ``detectron2.modeling.backbone.resnet.DeformConv``/``ModulatedDeformConv`` (the names
      ``DeformBottleneckBlock`` instantiates) become ours, so ``build_resnet_backbone`` and
      ``build_resnet_fpn_backbone`` with ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` work on CPU and
      CUDA, train under AMP and load Detectron2 DCN weights unchanged (same parameter names).
    - ``detectron2.layers.DeformConv``/``ModulatedDeformConv`` (and ``detectron2.layers
      .deform_conv``'s) are replaced only when they are the placeholders of a build without
      ``_C``.

    Set ``QS_KEEP_D2_DEFORM_CONV=1`` to leave a compiled Detectron2's classes everywhere (exact
    kernel parity with Detectron2; its CPU backward raises). Idempotent.
    """
    import detectron2.layers as d2_layers
    import detectron2.layers.deform_conv as d2_deform_conv
    import detectron2.modeling.backbone.resnet as d2_resnet

    d2_classes = (d2_deform_conv.DeformConv, d2_deform_conv.ModulatedDeformConv)
    placeholder = any(_is_placeholder(c) for c in d2_classes)
    if os.environ.get("QS_KEEP_D2_DEFORM_CONV", "0") == "1" and not placeholder:
        logger.info("QS_KEEP_D2_DEFORM_CONV=1: keeping detectron2's compiled DeformConv")
        return
    d2_resnet.DeformConv = DeformConv
    d2_resnet.ModulatedDeformConv = ModulatedDeformConv
    if placeholder:
        for module in (d2_layers, d2_deform_conv):
            module.DeformConv = DeformConv
            module.ModulatedDeformConv = ModulatedDeformConv
