#!/usr/bin/env python
"""Convert official K-Net checkpoints (ZwwWayne/K-Net mmdet models, mmseg K-Net models) to QuerySeg.

Usage::

    python tools/convert_knet.py knet_s3_r50_fpn_1x_coco_20211016_113017-8a8645d4.pth \
        knet_R50_1x_coco_qs.pth --format instance
    python tools/convert_knet.py <...coco-panoptic...>.pth out.pth --format panoptic \
        --config-file projects/knet/configs/knet_R101_DCN_ms3x_coco_panoptic.yaml
    python tools/convert_knet.py <knet_s3_fcn_r50-d8...ade20k...>.pth out.pth --format semantic

``--format`` picks the source layout (``instance``/``panoptic``: the detection codebase, mmdet
``backbone``/``neck``/``rpn_head``/``roi_head.mask_head``; ``semantic``: mmseg
``backbone``/``decode_head.kernel_{generate,update}_head``/``auxiliary_head``). Without
``--config-file`` the R50 config of the format is used; the converted weights are checked against
the model it builds and nothing is written unless every key maps with the model's shape.

What changes (spec ``knet_queryinst.md`` A7; details in ``projects/knet/README.md``):

- backbone: mmdet/mmseg ResNet (plain or ResNetV1c deep stem, DCN offsets) -> Detectron2 names
  (:func:`common.convert.rules.resnet_rules`); mmcv Swin (``stages.i.blocks.j.attn.w_msa``,
  patch merging by ``nn.Unfold``) -> ``SwinBackbone`` (``common.convert.rules.swin_rules`` with
  ``layout="mmcv"``, which reorders the patch-merging channels);
- mmcv ``ConvModule`` (``.conv`` + ``.gn``/``.bn``) -> Detectron2 ``Conv2d`` (weight + ``.norm``);
  mmcv ``FFN`` ``layers.0.0``/``layers.1`` -> ``ffn.0``/``ffn.3``; mmcv ``MultiheadAttention``
  ``attention.attn.*`` -> ``attention.*`` (the packed q/k/v ``in_proj`` layout is PyTorch's in
  both, so no tensor changes);
- class rows of ``conv_seg``/``fc_cls`` are reordered from mmdet's COCO order to Detectron2's,
  matched by class name (the orders coincide; the permutation is computed, not assumed); ADE20K
  classes are label values of the same annotation PNGs in mmseg and Detectron2 (kept in place);
- dropped on purpose: BatchNorm ``num_batches_tracked`` where the model has no slot (FrozenBN),
  Swin's ``relative_position_index`` buffers (rebuilt by timm); the solver state is never read.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.convert.cli import converter_main  # noqa: E402
from common.convert.core import (  # noqa: E402
    CheckpointError,
    ConversionReport,
    Rule,
    class_permutation,
    convert_state_dict,
    permute_rows,
)
from common.convert.rules import (  # noqa: E402
    MMDET_COCO_CLASSES,
    drop_unused_batch_counters,
    resnet_rules,
    swin_rules,
)

FORMATS = ("instance", "panoptic", "semantic")
CONFIG_DIR = os.path.join(REPO, "projects", "knet", "configs")
#: ``--config-file`` default of each format: the R50 model of that format.
DEFAULT_CONFIGS = {
    "instance": os.path.join(CONFIG_DIR, "knet_R50_1x_coco.yaml"),
    "panoptic": os.path.join(CONFIG_DIR, "knet_R50_1x_coco_panoptic.yaml"),
    "semantic": os.path.join(CONFIG_DIR, "knet_fcn_R50-D8_80k_ade20k.yaml"),
}
#: Number of class rows of ``conv_seg``/``fc_cls`` in each released format.
NUM_CLASSES = {"instance": 80, "panoptic": 133, "semantic": 150}

#: mmdet ``CocoPanopticDataset.STUFF_CLASSES`` (after ``THING_CLASSES`` = the 80 COCO classes):
#: the 53 stuff classes in the order of mmdet's panoptic labels 80..132.
MMDET_COCO_PANOPTIC_STUFF = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood",
    "flower", "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform",
    "playingfield", "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs",
    "tent", "towel", "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "window-blind", "window-other", "tree-merged", "fence-merged", "ceiling-merged",
    "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged", "pavement-merged",
    "mountain-merged", "grass-merged", "dirt-merged", "paper-merged", "food-other-merged",
    "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)  # fmt: skip

_WB = r"(weight|bias)"
_NORM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


# --------------------------------------------------------------------------------------------
# Class order
# --------------------------------------------------------------------------------------------


def detectron2_class_names(fmt: str) -> list[str]:
    """QuerySeg's class order for ``fmt``: Detectron2's builtin COCO metadata (instance: the 80
    ``thing_classes``; panoptic: the 133 ``stuff_classes`` of the standard registration, things
    first, i.e. the contiguous ids the panoptic mapper assigns)."""
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    if fmt == "instance":
        return list(_get_builtin_metadata("coco")["thing_classes"])
    if fmt == "panoptic":
        return list(_get_builtin_metadata("coco_panoptic_standard")["stuff_classes"])
    raise ValueError(f"no COCO class order for format {fmt!r}")


def mmdet_class_names(fmt: str) -> list[str]:
    """mmdet's class order of the released K-Net models of ``fmt`` (instance / panoptic)."""
    if fmt == "instance":
        return list(MMDET_COCO_CLASSES)
    if fmt == "panoptic":
        return [*MMDET_COCO_CLASSES, *MMDET_COCO_PANOPTIC_STUFF]
    raise ValueError(f"no mmdet class order for format {fmt!r}")


def class_order(fmt: str) -> list[int] | None:
    """Permutation ``p`` with ``official_rows[p]`` in QuerySeg's class order, matched by name;
    None for ``semantic`` (ADE20K: both read the class as the label value of the same PNGs).

    Panoptic: things must stay in rows 0..79 (the stuff kernels are ``conv_seg`` rows 80..132).
    """
    if fmt == "semantic":
        return None
    perm = class_permutation(
        mmdet_class_names(fmt), detectron2_class_names(fmt), f"K-Net {fmt} (mmdet -> Detectron2)"
    )
    things = len(MMDET_COCO_CLASSES)
    if fmt == "panoptic" and sorted(perm[:things]) != list(range(things)):
        raise CheckpointError("Detectron2's panoptic classes do not list the 80 things first")
    return perm


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def _conv_module_rules(src: str, dst: str, modules: str) -> list[Rule]:
    """mmcv ``ConvModule`` s ``{src}<m>.conv`` / ``.gn`` / ``.bn`` (``m`` matching ``modules``)
    -> Detectron2 ``Conv2d`` ``{dst}<m>`` / ``.norm``."""
    mod = rf"{re.escape(src)}({modules})"
    return [
        Rule(rf"{mod}\.conv\.{_WB}", rf"{dst}\1.\2"),
        Rule(rf"{mod}\.(?:gn|bn)\.{_NORM}", rf"{dst}\1.norm.\2"),
    ]


def update_head_rules(src: str, dst: str, cls_rows: Any = None) -> list[Rule]:
    """One official ``KernelUpdateHead`` (det or seg) at ``src`` -> QuerySeg's at ``dst``.

    ``cls_rows``: transform of the ``fc_cls`` rows (class order), None to keep them.
    """
    s = re.escape(src)
    upd = r"(dynamic_layer|input_layer|input_gate|update_gate|fc_layer|norm_in|norm_out"
    upd += r"|input_norm_in|input_norm_out|fc_norm)"
    return [
        Rule(rf"{s}attention\.attn\.(in_proj_weight|in_proj_bias)", rf"{dst}attention.\1"),
        Rule(rf"{s}attention\.attn\.out_proj\.{_WB}", rf"{dst}attention.out_proj.\1"),
        Rule(rf"{s}(attention_norm|ffn_norm|fc_mask)\.{_WB}", rf"{dst}\1.\2"),
        Rule(rf"{s}kernel_update_conv\.{upd}\.{_WB}", rf"{dst}kernel_update_conv.\1.\2"),
        Rule(rf"{s}feat_transform\.conv\.{_WB}", rf"{dst}feat_transform.\1"),
        Rule(rf"{s}ffn\.layers\.0\.0\.{_WB}", rf"{dst}ffn.0.\1"),
        Rule(rf"{s}ffn\.layers\.1\.{_WB}", rf"{dst}ffn.3.\1"),
        Rule(rf"{s}(cls_fcs|mask_fcs)\.(\d+)\.{_WB}", rf"{dst}\1.\2.\3"),
        Rule(rf"{s}fc_cls\.{_WB}", rf"{dst}fc_cls.\1", cls_rows),
    ]


def backbone_rules(state: Mapping[str, torch.Tensor]) -> list[Rule]:
    """ResNet (plain stem: mmdet; deep stem: mmseg ResNetV1c; DCN offsets) or mmcv Swin."""
    if any(k.startswith("backbone.stages.") for k in state):
        return swin_rules("backbone.", "backbone.", layout="mmcv")
    deep = any(k.startswith("backbone.stem.") for k in state)
    return resnet_rules("backbone.", "backbone.", deep_stem=deep)


def det_rules(fmt: str, state: Mapping[str, torch.Tensor]) -> list[Rule]:
    """Detection codebase (instance / panoptic) -> ``KNet``."""
    perm = class_order(fmt)
    rows = permute_rows(perm) if perm is not None else None
    fpn = r"convs_all_levels\.\d+\.conv\d+|conv_pred|aux_convs\.0"
    rules = [
        *backbone_rules(state),
        Rule(rf"neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.{_WB}", r"neck.\1.\2.\3"),
        Rule(r"rpn_head\.init_kernels\.weight", "kernel_head.init_kernels.weight"),
        Rule(rf"rpn_head\.conv_seg\.{_WB}", r"kernel_head.conv_seg.\1", rows),
        *_conv_module_rules(
            "rpn_head.", "kernel_head.", rf"localization_fpn\.(?:{fpn})|loc_convs\.0|seg_convs\.0"
        ),
    ]
    for i in _stage_indices(state, "roi_head.mask_head."):
        rules += update_head_rules(f"roi_head.mask_head.{i}.", f"kernel_update_heads.{i}.", rows)
    return rules


def semantic_rules(state: Mapping[str, torch.Tensor]) -> list[Rule]:
    """mmseg ``IterativeDecodeHead`` models (FCN / PSP / ASPP / UPerNet) -> ``KNetSemantic``."""
    head = (
        r"convs\.\d+|conv_cat|psp_modules\.\d+\.1|bottleneck|image_pool\.1|aspp_modules\.\d+"
        r"|lateral_convs\.\d+|fpn_convs\.\d+|fpn_bottleneck"
    )
    gen = "decode_head.kernel_generate_head."
    rules = [
        *backbone_rules(state),
        Rule(rf"{re.escape(gen)}conv_seg\.{_WB}", r"decode_head.conv_seg.\1"),
        *_conv_module_rules(gen, "decode_head.", head),
        Rule(rf"auxiliary_head\.conv_seg\.{_WB}", r"aux_head.conv_seg.\1"),
        *_conv_module_rules("auxiliary_head.", "aux_head.", r"convs\.\d+"),
    ]
    for i in _stage_indices(state, "decode_head.kernel_update_head."):
        rules += update_head_rules(
            f"decode_head.kernel_update_head.{i}.", f"kernel_update_heads.{i}."
        )
    return rules


def _stage_indices(state: Iterable[str], prefix: str) -> list[int]:
    found = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def check_format(state: Mapping[str, torch.Tensor], fmt: str) -> None:
    """Refuse a checkpoint of another codebase or task than ``fmt``, naming the evidence."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown K-Net format {fmt!r}; expected one of {FORMATS}")
    if fmt == "semantic":
        key = "decode_head.kernel_generate_head.conv_seg.weight"
    else:
        key = "rpn_head.conv_seg.weight"
    if key not in state:
        other = "semantic" if "decode_head.kernel_generate_head.conv_seg.weight" in state else ""
        other = other or ("instance/panoptic" if "rpn_head.conv_seg.weight" in state else "")
        hint = f" (it looks like --format {other})" if other else ""
        raise CheckpointError(f"not a K-Net {fmt} checkpoint: no {key}{hint}")
    rows = state[key].shape[0]
    if rows != NUM_CLASSES[fmt]:
        guess = [f for f, n in NUM_CLASSES.items() if n == rows and f != "semantic"]
        hint = f" (--format {guess[0]}?)" if guess and fmt != "semantic" else ""
        raise CheckpointError(
            f"{key} has {rows} class rows; the released K-Net {fmt} models have "
            f"{NUM_CLASSES[fmt]}{hint}"
        )


def convert_knet(
    state: Mapping[str, torch.Tensor], fmt: str, model_keys: Iterable[str] | None = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert an official K-Net state dict (``module.`` already stripped) of format ``fmt``.

    Args:
        state: the official ``state_dict`` ({name: tensor}).
        fmt: "instance" | "panoptic" (mmdet, ZwwWayne/K-Net) | "semantic" (mmseg).
        model_keys: the target model's state-dict keys; BatchNorm counters it has no slot for
            (FrozenBN) are dropped. None: drop them for instance/panoptic (FrozenBN backbone in
            every released config), keep them for semantic (SyncBN everywhere).

    Returns:
        (QuerySeg state dict, report of unmapped / duplicate keys). Shapes are checked against
        the model by :func:`common.convert.core.check_against_model`.
    """
    check_format(state, fmt)
    rules = semantic_rules(state) if fmt == "semantic" else det_rules(fmt, state)
    out, report = convert_state_dict(state, rules)
    if model_keys is not None:
        out = drop_unused_batch_counters(out, model_keys)
    elif fmt != "semantic":
        out = {k: v for k, v in out.items() if not k.endswith(".num_batches_tracked")}
    return out, report


def _convert(state: dict[str, torch.Tensor], args: Any) -> tuple[dict, ConversionReport]:
    model = getattr(args, "model", None)
    keys = model.state_dict().keys() if model is not None else None
    return convert_knet(state, args.format, keys)


def _config_argv(argv: Sequence[str]) -> list[str]:
    """Add ``--config-file <the format's default>`` when none is given."""
    argv = list(argv)
    if any(a == "--config-file" or a.startswith("--config-file=") for a in argv):
        return argv
    fmt = FORMATS[0]
    for i, a in enumerate(argv):
        if a == "--format" and i + 1 < len(argv):
            fmt = argv[i + 1]
        elif a.startswith("--format="):
            fmt = a.split("=", 1)[1]
    return ["--config-file", DEFAULT_CONFIGS.get(fmt, DEFAULT_CONFIGS["instance"]), *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``src dst [--format F] [--config-file C] [--trust] [KEY VALUE ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = ", ".join(f"{f}: {os.path.relpath(c, REPO)}" for f, c in DEFAULT_CONFIGS.items())
    return converter_main(
        f"{__doc__.splitlines()[0]} Default --config-file by --format: {defaults}.",
        _convert,
        None,
        argv=_config_argv(argv),
        formats=FORMATS,
    )


if __name__ == "__main__":
    sys.exit(main())
