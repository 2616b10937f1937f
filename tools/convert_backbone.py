#!/usr/bin/env python
"""Convert ImageNet backbone weights (torchvision / timm ResNet, official / timm Swin) to QuerySeg.

Written against: torchvision ``resnet50-0676ba61.pth`` and ``resnet101-63fe2227.pth`` (->
Detectron2 ``ResNet``, ``STRIDE_IN_1X1: False``, RGB: the K-Net, QueryInst and FastInst R50/R101
configs), timm ``resnet50d_ra2-464e36ba.pth`` (-> ``common.ops`` ResNet-vd, FastInst R50-d-DCN)
and Swin ImageNet-22K weights (``swin_tiny_patch4_window7_224``, ``swin_large_patch4_window7_224
_22k``, ``swin_large_patch4_window12_384_22k``; Swin-official ``{"model": ...}`` files or timm's
``*.ms_in22k`` state dicts) -> ``common.ops`` Swin. Usage::

    python tools/convert_backbone.py resnet50-0676ba61.pth checkpoints/R-50.pth \\
        --config-file projects/queryinst/configs/queryinst_R50_FPN_1x_coco.yaml
    # then: train_net.py --config-file <same yaml> MODEL.WEIGHTS checkpoints/R-50.pth

The keys are written under the config's backbone (``backbone.bottom_up.`` inside an FPN,
``backbone.`` otherwise, e.g. ``backbone.bottom_up.res2.0.conv1.weight``) and must equal that
backbone's keys and shapes exactly; otherwise nothing is written and the differences are
listed. Parameters an ImageNet classifier does not have are given the official detection
code's initial value and listed: Swin's output norms ``norm0..3`` (1, 0) and the zero offset
convs of deformable res4/res5 blocks. The classifier (``fc``, ``head``, final ``norm``) is
dropped. The config must take RGB input with ImageNet statistics and, for ResNets,
``STRIDE_IN_1X1: False`` (the weights were trained that way). The file holds only ``backbone.*``
keys, which ``common.engine.checkpoint.QSCheckpointer`` accepts as an initialisation that leaves the
heads to the model.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.convert.cli import converter_main  # noqa: E402
from common.convert.core import CheckpointError, ConversionReport, convert_state_dict  # noqa: E402
from common.convert.rules import (  # noqa: E402
    drop_unused_batch_counters,
    initial_values,
    resnet_layout,
    resnet_rules,
    swin_layout,
    swin_rules,
)

logger = logging.getLogger("convert_backbone")

FORMATS = ("auto", "resnet", "swin")
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 (torchvision and timm defaults)
IMAGENET_STD = (58.395, 57.12, 57.375)


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """ "resnet" (torchvision / timm names) or "swin" (official / timm names)."""
    if "patch_embed.proj.weight" in state:
        return "swin"
    if "layer1.0.conv1.weight" in state:
        return "resnet"
    keys = list(state)
    raise CheckpointError(
        "not an ImageNet ResNet (conv1, layer1.0.conv1, ...) or Swin (patch_embed.proj, "
        f"layers.*) state dict; first keys: {', '.join(keys[:5])}"
    )


def backbone_prefix(model: torch.nn.Module) -> str:
    """Where the ImageNet network sits in ``model``: ``backbone.bottom_up.`` (FPN) or
    ``backbone.``."""
    return "backbone.bottom_up." if hasattr(model.backbone, "bottom_up") else "backbone."


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` an ImageNet backbone file must match exactly."""
    prefix = backbone_prefix(model)
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def check_input_convention(cfg, fmt: str) -> None:
    """Refuse a config whose input convention differs from the weights' (RGB, ImageNet
    statistics; ResNet stride in the 3x3 conv); shapes alone would not show it."""
    problems = []
    if cfg.INPUT.FORMAT != "RGB":
        problems.append(f"INPUT.FORMAT is {cfg.INPUT.FORMAT} (the weights take RGB)")
    for name, value, ref in (("PIXEL_MEAN", cfg.MODEL.PIXEL_MEAN, IMAGENET_MEAN),
                             ("PIXEL_STD", cfg.MODEL.PIXEL_STD, IMAGENET_STD)):  # fmt: skip
        if len(value) != 3 or any(abs(a - b) > 1e-3 for a, b in zip(value, ref)):
            problems.append(f"MODEL.{name} is {list(value)} (ImageNet RGB: {list(ref)})")
    if fmt == "resnet" and cfg.MODEL.RESNETS.STRIDE_IN_1X1:
        problems.append("MODEL.RESNETS.STRIDE_IN_1X1 is True (the stride is in the 3x3 conv)")
    if problems:
        raise CheckpointError("the config does not match the weights: " + "; ".join(problems))


def convert_backbone(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor] | None = None,
    fmt: str = "auto",
    prefix: str | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert an ImageNet ResNet / Swin state dict to QuerySeg backbone keys.

    Args:
        state: the ImageNet state dict (torchvision / timm / Swin-official names).
        target: the model's backbone state (:func:`backbone_state`); decides the prefix, which
            BatchNorm counters to keep, and the shapes of initial-value parameters.
        fmt: "auto", "resnet" or "swin".
        prefix: key prefix when there is no target (default ``backbone.bottom_up.``).

    Returns:
        The converted state and the report of unmapped / duplicated keys.
    """
    fmt = detect_format(state) if fmt == "auto" else fmt
    if prefix is None:
        prefix = "backbone.bottom_up."
        if target is not None and not any(k.startswith(prefix) for k in target):
            prefix = "backbone."
    if fmt == "resnet":
        rules = resnet_rules("", prefix, **resnet_layout(state))
    elif fmt == "swin":
        layout = swin_layout(state)
        if layout == "mmcv":
            raise CheckpointError("mmcv-format Swin (stages.*, w_msa) is not supported")
        rules = swin_rules("", prefix, layout=layout)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out, report = convert_state_dict(state, rules)
    if target is not None:
        out = drop_unused_batch_counters(out, target)
        filled = initial_values(out, target)
        if filled:
            logger.info(
                "%d parameters not in the ImageNet weights start from the official initial "
                "value: %s",
                len(filled),
                ", ".join(sorted(filled)),
            )
        out.update(filled)
    return out, report


def _convert(state, args):
    if args.model is None:
        raise CheckpointError("--config-file is required: the config whose backbone this is for")
    fmt = detect_format(state) if args.format == "auto" else args.format
    check_input_convention(args.cfg, fmt)
    return convert_backbone(state, backbone_state(args.model), fmt)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return converter_main(
        __doc__.splitlines()[0], _convert, None, argv, formats=FORMATS, target=backbone_state
    )


if __name__ == "__main__":
    sys.exit(main())
