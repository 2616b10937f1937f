"""A test-only stand-in for ``mmcv._ext``, the compiled extension that mmcv-lite does not ship.

mmcv's Python ops (``mmcv/ops/*.py``) look their kernels up at import time with
``ext_loader.load_ext("_ext", [names])``, which only checks that the attributes exist. This module
answers every name: the few kernels the parity references run are implemented here with
torchvision's operators, in the calling convention of mmcv's C++ bindings (outputs written into
the tensors the caller allocated); any other kernel raises ``NotImplementedError`` naming itself
when it is called, so a reference path that needs one fails loudly instead of computing something
else.

Implemented:

- ``roi_align_forward`` / ``roi_align_backward`` (``pool_mode=1``, average): torchvision's
  ``roi_align`` is the same bilinear RoIAlign (Detectron's) with the same ``aligned`` half-pixel
  shift and the same adaptive ``sampling_ratio=0``; the backward is torchvision's autograd.
- ``nms`` (``offset=0``): ``torchvision.ops.nms``.
"""

from __future__ import annotations

import sys
import types

import torch
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align


def _check_avg(pool_mode: int) -> None:
    if pool_mode != 1:
        raise NotImplementedError("mmcv_ext_shim: RoIAlign max pooling (pool_mode=0)")


def roi_align_forward(
    input, rois, output, argmax_y, argmax_x, *, aligned_height, aligned_width, spatial_scale,
    sampling_ratio, pool_mode, aligned,
):  # fmt: skip
    _check_avg(pool_mode)
    out = tv_roi_align(
        input, rois.to(input.dtype), (aligned_height, aligned_width), spatial_scale,
        sampling_ratio, aligned,
    )  # fmt: skip
    output.copy_(out)


def roi_align_backward(
    grad_output, rois, argmax_y, argmax_x, grad_input, *, aligned_height, aligned_width,
    spatial_scale, sampling_ratio, pool_mode, aligned,
):  # fmt: skip
    _check_avg(pool_mode)
    with torch.enable_grad():
        x = torch.zeros_like(grad_input, requires_grad=True)
        out = tv_roi_align(
            x, rois.to(x.dtype), (aligned_height, aligned_width), spatial_scale,
            sampling_ratio, aligned,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(out, x, grad_output)
    grad_input.copy_(grad)


def nms(bboxes, scores, *, iou_threshold, offset):
    if offset != 0:
        raise NotImplementedError("mmcv_ext_shim: nms with offset != 0")
    return tv_nms(bboxes, scores, float(iou_threshold))


_IMPLEMENTED = {
    "roi_align_forward": roi_align_forward,
    "roi_align_backward": roi_align_backward,
    "nms": nms,
}


class _ExtModule(types.ModuleType):
    """``mmcv._ext``: the kernels above, and a named ``NotImplementedError`` for any other."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv._ext.{name} is not provided by tests/parity/mmcv_ext_shim.py "
                "(mmcv-lite has no compiled ops); add it there if a parity test needs it"
            )

        missing.__name__ = name
        return missing


def install() -> types.ModuleType:
    """Register the shim as ``mmcv._ext`` (idempotent); import ``mmcv`` first."""
    import mmcv

    ext = sys.modules.get("mmcv._ext")
    if not isinstance(ext, _ExtModule):
        ext = _ExtModule("mmcv._ext", __doc__)
        for name, fn in _IMPLEMENTED.items():
            setattr(ext, name, fn)
        sys.modules["mmcv._ext"] = ext
        mmcv._ext = ext
    return ext
