#!/usr/bin/env python
"""Convert an official QueryInst checkpoint (hustvl/QueryInst, mmdet 2.x / 3.x) to QuerySeg.

Written against the layout of spec B7 (the official repo and mmdet 2.x/3.x share it) for the
model-zoo files of spec B6: mmdet ``queryinst_r50_fpn_1x_coco_20210907_084916-5a8f1998.pth``,
``queryinst_r50_fpn_mstrain_480-800_3x_coco_20210901_103643-7837af86.pth``,
``queryinst_r50_fpn_300_proposals_crop_mstrain_480-800_3x_coco_20210904_101802-85cffbd8.pth``,
``queryinst_r101_fpn_mstrain_480-800_3x_coco_20210904_104048-91f9995b.pth``,
``queryinst_r101_fpn_300_proposals_crop_mstrain_480-800_3x_coco_20210904_153621-76cce59f.pth``
and the official ``queryinst_swin_large_patch4_window7_fpn_300_proposals_crop_mstrain_400-1200
_50e_coco`` (Swin-official backbone names). Usage::

    python tools/convert_queryinst.py queryinst_r50_fpn_1x_coco_20210907_084916-5a8f1998.pth \\
        queryinst_R50_FPN_1x_coco.pth \\
        --config-file projects/queryinst/configs/queryinst_R50_FPN_1x_coco.yaml

``--to-cityscapes`` writes the initialisation of the Cityscapes config instead (COCO's 80 class
rows mapped by name to Cityscapes' 8; rider, which COCO lacks, starts from the Cityscapes model's
own initialisation unless ``--class-source rider=person``); the source may then also be a
QuerySeg COCO checkpoint (``backbone.bottom_up.*`` keys, Detectron2's COCO class order)::

    python tools/convert_queryinst.py \
        queryinst_r50_fpn_300_proposals_crop_mstrain_480-800_3x_coco_20210904_101802-85cffbd8.pth \
        checkpoints/queryinst_R50_FPN_300q_coco_to_cityscapes.pth --to-cityscapes

What changes: the backbone (mmdet ResNet -> ``backbone.bottom_up.res*``, Detectron2 names; Swin
``layers.i.downsample`` moved to stage i + 1, position-index buffers dropped) and the neck
(``neck.{lateral,fpn}_convs.i.conv`` -> ``backbone.fpn_{lateral,output}{i+2}``); the class rows
of ``fc_cls`` and ``conv_logits`` are reordered from mmdet's COCO class order to Detectron2's by
name. The proposals and the heads keep their names (``projects/queryinst`` mirrors them) and their
tensors: the attention's packed ``in_proj_weight`` [3C, C] is q/k/v in both, and the dynamic
layer's split order (``param_in`` then ``param_out``) is the same. BatchNorm counters the model
has no slot for (FrozenBN backbone) are dropped. Nothing is written when a key is unmapped, a
model key is not produced or a shape differs; the error lists them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.convert.cli import converter_main  # noqa: E402
from common.convert.core import (  # noqa: E402
    CheckpointError,
    ConversionReport,
    Rule,
    class_permutation,
    class_row_sources,
    convert_state_dict,
    permute_rows,
    remap_class_rows,
)
from common.convert.rules import (  # noqa: E402
    CITYSCAPES_FROM_COCO,
    MMDET_COCO_CLASSES,
    drop_unused_batch_counters,
    fpn_rules,
    resnet_layout,
    resnet_rules,
    swin_layout,
    swin_rules,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "projects/queryinst/configs/queryinst_R50_FPN_1x_coco.yaml"
CITYSCAPES_CONFIG = "projects/queryinst/configs/queryinst_R50_FPN_300q_ms_24k_cityscapes.yaml"
#: Every stage's class rows: the DIIHead classifier and the mask head's class-specific masks.
CLASS_ROW_KEYS = (
    r"roi_head\.(?:bbox_head\.\d+\.fc_cls|mask_head\.\d+\.conv_logits)\.(?:weight|bias)"
)

_W = r"(weight|bias)"
#: DIIHead parameters (spec B7), ``roi_head.bbox_head.{t}.`` + these; the same names in ours.
_BBOX_HEAD = (
    r"attention\.attn\.(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
    rf"attention_norm\.{_W}",
    rf"instance_interactive_conv\.(?:dynamic_layer|norm_in|norm_out|fc_layer|fc_norm)\.{_W}",
    rf"instance_interactive_conv_norm\.{_W}",
    rf"ffn\.layers\.(?:0\.0|1)\.{_W}",
    rf"ffn_norm\.{_W}",
    rf"cls_fcs\.\d+\.{_W}",
    rf"reg_fcs\.\d+\.{_W}",
    rf"fc_reg\.{_W}",
)
#: DynamicMaskHead parameters, ``roi_head.mask_head.{t}.`` + these (no ``fc_layer``: no proj).
_MASK_HEAD = (
    rf"instance_interactive_conv\.(?:dynamic_layer|norm_in|norm_out)\.{_W}",
    r"convs\.\d+\.conv\.weight",
    r"convs\.\d+\.bn\.(?:weight|bias|running_mean|running_var|num_batches_tracked)",
    rf"upsample\.{_W}",
)


def coco_thing_classes() -> list[str]:
    """Detectron2's COCO thing classes in its contiguous order (``builtin_meta``)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["name"] for c in COCO_CATEGORIES if c["isthing"]]


def queryinst_rules(
    backbone: str,
    src_classes: Sequence[str] = MMDET_COCO_CLASSES,
    dst_classes: Sequence[str] | None = None,
) -> list[Rule]:
    """Rules from the official QueryInst layout to ``projects/queryinst``.

    Args:
        backbone: "resnet" (mmdet ResNet-50/101) or "swin" (Swin-official names).
        src_classes: class names in the order of the checkpoint's class rows (mmdet COCO).
        dst_classes: the order QuerySeg's model uses (default: Detectron2's COCO things).
    """
    perm = class_permutation(
        src_classes, dst_classes or coco_thing_classes(), "QueryInst class rows"
    )
    classes = permute_rows(perm)
    if backbone == "resnet":
        rules = resnet_rules("backbone.", "backbone.bottom_up.")
    elif backbone == "swin":
        rules = swin_rules("backbone.", "backbone.bottom_up.", layout="official")
    else:
        raise ValueError(f"backbone must be 'resnet' or 'swin', got {backbone!r}")
    rules += fpn_rules("neck.", "backbone.")
    rules += [
        Rule(r"rpn_head\.(init_proposal_(?:bboxes|features)\.weight)", r"rpn_head.\1"),
        Rule(rf"roi_head\.bbox_head\.(\d+)\.fc_cls\.{_W}", r"roi_head.bbox_head.\1.fc_cls.\2",
             classes),
        Rule(rf"roi_head\.mask_head\.(\d+)\.conv_logits\.{_W}",
             r"roi_head.mask_head.\1.conv_logits.\2", classes),
    ]  # fmt: skip
    rules += [Rule(rf"(roi_head\.bbox_head\.\d+\.{p})", r"\1") for p in _BBOX_HEAD]
    rules += [Rule(rf"(roi_head\.mask_head\.\d+\.{p})", r"\1") for p in _MASK_HEAD]
    return rules


def detect_backbone(state: Mapping[str, torch.Tensor]) -> str:
    """ "resnet" or "swin" from the ``backbone.*`` keys; refuses other layouts by name."""
    keys = list(state)
    if "backbone.layer1.0.conv1.weight" in state:
        layout = resnet_layout(keys, "backbone.")
        if layout["deep_stem"] or layout["avg_down"]:
            raise CheckpointError("ResNet-C/D backbones are not among QueryInst's configs")
        return "resnet"
    if any(k.startswith("backbone.layers.") for k in keys):
        layout = swin_layout(keys, "backbone.")
        if layout != "official":
            raise CheckpointError(
                f"{layout} Swin names in the backbone; QueryInst's Swin checkpoints use the "
                "Swin-official names (backbone.layers.i.downsample at the end of stage i)"
            )
        return "swin"
    raise CheckpointError(
        "not a QueryInst checkpoint: no mmdet ResNet (backbone.layer1.*) or Swin "
        f"(backbone.layers.*) backbone; first keys: {', '.join(keys[:5])}"
    )


def convert_queryinst(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor] | None = None,
    src_classes: Sequence[str] = MMDET_COCO_CLASSES,
    dst_classes: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert an official QueryInst state dict.

    Args:
        state: the checkpoint's ``state_dict`` (official key names, spec B7).
        target: the QuerySeg model's ``state_dict()``; decides which BatchNorm counters to keep
            (without it those of the backbone are dropped: FrozenBN in every config).
        src_classes, dst_classes: see :func:`queryinst_rules`.

    Returns:
        The converted state and the report of unmapped / duplicated keys (the caller adds the
        comparison with the model, :func:`common.convert.core.check_against_model`).
    """
    rules = queryinst_rules(detect_backbone(state), src_classes, dst_classes)
    out, report = convert_state_dict(state, rules)
    if target is not None:
        out = drop_unused_batch_counters(out, target)
    else:
        out = {
            k: v for k, v in out.items()
            if not (k.startswith("backbone.") and k.endswith(".num_batches_tracked"))
        }  # fmt: skip
    return out, report


def is_queryseg_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a QuerySeg QueryInst state dict (Detectron2 backbone names)."""
    return any(k.startswith("backbone.bottom_up.") for k in state)


def convert_queryinst_to_classes(
    state: Mapping[str, torch.Tensor],
    dst_classes: Sequence[str],
    target: Mapping[str, torch.Tensor],
    class_sources: Mapping[str, str | None] | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """A COCO QueryInst checkpoint as the initialisation of a model for other classes.

    Args:
        state: an official checkpoint's state dict (spec B7 names, mmdet's COCO class order) or a
            QuerySeg one (Detectron2's names and COCO class order).
        dst_classes: the target model's classes, in its order (e.g. Cityscapes' 8).
        target: the target model's ``state_dict()``: its shapes are checked by the caller, and
            its own (random) rows initialise the classes without a source row.
        class_sources: per target class, the source class whose rows it starts from instead of
            its namesake; ``None`` for the model's initialisation. Default:
            :data:`common.convert.rules.CITYSCAPES_FROM_COCO` (rider from the initialisation).

    Every stage's ``fc_cls`` and ``conv_logits`` rows are selected by class name
    (:func:`common.convert.core.class_row_sources`); all other tensors are converted as usual.
    """
    if is_queryseg_layout(state):
        src_classes = coco_thing_classes()
        converted, report = dict(state), ConversionReport()
    else:
        src_classes = MMDET_COCO_CLASSES  # keep the checkpoint's order; rows are picked by name
        converted, report = convert_queryinst(state, target, src_classes, src_classes)
    if class_sources is None:
        class_sources = {k: v for k, v in CITYSCAPES_FROM_COCO.items() if k in dst_classes}
    rows = class_row_sources(src_classes, dst_classes, "QueryInst class rows", class_sources)
    missing = [n for n, r in zip(dst_classes, rows) if r is None]
    logger.info(
        "class rows by name: %s",
        ", ".join(
            f"{n}<-{src_classes[r] if r is not None else 'model init'}"
            for n, r in zip(dst_classes, rows)
        ),
    )
    if missing:
        logger.info("classes starting from the model's initialisation: %s", missing)
    return remap_class_rows(converted, CLASS_ROW_KEYS, rows, target), report


def _parse_class_sources(items: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        dst, sep, src = item.partition("=")
        if not sep or not dst:
            raise CheckpointError(f"--class-source {item!r}: expected TARGET=SOURCE or TARGET=")
        out[dst] = src or None
    return out


def _add_arguments(parser) -> None:
    parser.add_argument(
        "--to-cityscapes", action="store_true",
        help="map COCO's class rows by name to the classes of the config's training set (default "
             f"config then {CITYSCAPES_CONFIG}); the source may also be a QuerySeg checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--class-source", action="append", default=[], metavar="TARGET=SOURCE",
        help="with --to-cityscapes: start TARGET's rows from SOURCE's (e.g. rider=person); "
             "TARGET= for the model's initialisation (default for rider)",
    )  # fmt: skip


def _convert(state, args):
    target = args.model.state_dict() if args.model is not None else None
    if not args.to_cityscapes:
        if args.class_source:
            raise CheckpointError("--class-source needs --to-cityscapes")
        return convert_queryinst(state, target)
    if target is None:
        raise CheckpointError("--to-cityscapes needs --config-file (the target model)")
    from detectron2.data import MetadataCatalog

    dataset = args.cfg.DATASETS.TRAIN[0]
    dst_classes = list(MetadataCatalog.get(dataset).thing_classes)
    sources = None
    if args.class_source:
        sources = {k: v for k, v in CITYSCAPES_FROM_COCO.items() if k in dst_classes}
        sources.update(_parse_class_sources(args.class_source))
    return convert_queryinst_to_classes(state, dst_classes, target, sources)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    default = CITYSCAPES_CONFIG if "--to-cityscapes" in argv else DEFAULT_CONFIG
    return converter_main(
        __doc__.splitlines()[0], _convert, default, argv, add_arguments=_add_arguments
    )


if __name__ == "__main__":
    sys.exit(main())
