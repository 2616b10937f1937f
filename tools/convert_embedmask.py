#!/usr/bin/env python
"""Convert an official EmbedMask checkpoint to QuerySeg's EmbedMask.

Usage::

    python tools/convert_embedmask.py embed_mask_R50_1x.pth embedmask_R50_1x_qs.pth
    python tools/convert_embedmask.py --format adelaidet EmbedMask_MS_R_50_1x.pth out.pth

Source formats (spec ``fastinst_embedmask_ops.md`` B.9):

- ``maskrcnn-benchmark`` (default): yinghdb/EmbedMask, ``{"model": ..., "optimizer", "scheduler",
  "iteration"}`` with ``module.`` prefixes. QuerySeg reproduces this code's v2 generation (per-dim
  margins, D = 16) and keeps its module names, so the head is a prefix rename
  (``rpn.head.{cls_tower,bbox_tower,cls_logits,bbox_pred,scales}`` ->
  ``proposal_generator.fcos_head.*``, ``centerness`` -> ``ctrness``, the embedding modules ->
  ``embed_head.*``); the ResNet uses :func:`common.convert.rules.resnet_rules` (torchvision
  names under ``backbone.body``) plus the maskrcnn-benchmark stem and FPN names
  (``fpn_inner{2,3,4}`` -> ``fpn_lateral{3,4,5}``, ``fpn_layer*`` -> ``fpn_output*``,
  ``top_blocks`` -> ``top_block``). The code generation is read off the margin conv:
  v2 (``proposal_margin_pred`` [D, 256, 3, 3] + ``margin_scales``) converts as is; v1.5 (scalar
  margin [1, 256, 3, 3], D = 8; the generation of the README's 34.7/36.4/38.1 models) converts for
  ``MODEL.EMBEDMASK.EMBED_DIM 8 MODEL.EMBEDMASK.MARGIN_PER_DIM False``, which the converter adds
  to the model check and prints; v1 (margin from the predicted box, a 1x1 conv on 4 channels) has
  no counterpart and is refused.
- ``adelaidet``: the author's Detectron2 port (yinghdb/AdelaiDet). Its backbone and FCOS keys are
  QuerySeg's, but its embedding part is another generation (CondInst-style ``mask_branch``,
  ``pixel_head``/``proposal_head`` on 128 channels, ``mask_pred`` buffers) that QuerySeg does not
  implement: the converter refuses it, listing those modules, rather than write a model whose
  embedding heads would be random.

BatchNorm eps: maskrcnn-benchmark's ``FrozenBatchNorm2d`` scales by ``weight / sqrt(running_var)``
with no eps, Detectron2's by ``weight / sqrt(running_var + eps)`` (eps = 1e-5), so every
``backbone.body.*.running_var`` is written as ``running_var - eps``
(:func:`frozen_bn_to_detectron2`).
The FCOS/embedding towers use GroupNorm (eps 1e-5 on both sides) and are copied as they are.

Class order: both codebases order the 80 COCO classes by category id, as Detectron2 does, so no
row is permuted. Nothing is written unless every key maps with the model's shape (checked against
the model of ``--config-file``, by default read off the checkpoint's depth: R50 -> the 1x config,
R101 -> the ms 3x config). Dropped on purpose: BatchNorm ``num_batches_tracked`` counters (the
backbone norm is FrozenBN); the solver state is never read.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common.convert.cli import converter_main  # noqa: E402
from common.convert.core import (  # noqa: E402
    CheckpointError,
    ConversionReport,
    Rule,
    convert_state_dict,
    extract_model_state,
    load_checkpoint_file,
)
from common.convert.rules import resnet_rules  # noqa: E402

CONFIG_DIR = os.path.join(REPO, "projects", "embedmask", "configs")
FORMATS = ("maskrcnn-benchmark", "adelaidet")
#: QuerySeg config per backbone depth (the R101 1x release has the same model as the ms 3x).
CONFIGS = {50: "embedmask_R50_1x_coco.yaml", 101: "embedmask_R101_ms_3x_coco.yaml"}

_NORM = r"(?:weight|bias|running_mean|running_var)"
_WB = r"(?:weight|bias)"
_FCOS = "proposal_generator.fcos_head."

#: maskrcnn-benchmark stem / FPN / EmbedMask head -> QuerySeg (the ResNet stages come from
#: :func:`resnet_rules`).
_MRCNN_RULES = (
    Rule(r"backbone\.body\.stem\.conv1\.weight", "backbone.bottom_up.stem.conv1.weight"),
    Rule(rf"backbone\.body\.stem\.bn1\.({_NORM})", r"backbone.bottom_up.stem.conv1.norm.\1"),
    *(
        Rule(rf"backbone\.fpn\.fpn_{src}{i}\.({_WB})", f"backbone.fpn_{dst}{i + 1}.\\1")
        for src, dst in (("inner", "lateral"), ("layer", "output"))
        for i in (2, 3, 4)
    ),
    Rule(rf"backbone\.fpn\.top_blocks\.(p6|p7)\.({_WB})", r"backbone.top_block.\1.\2"),
    Rule(rf"rpn\.head\.(cls_tower|bbox_tower)\.(\d+)\.({_WB})", _FCOS + r"\1.\2.\3"),
    Rule(rf"rpn\.head\.(cls_logits|bbox_pred)\.({_WB})", _FCOS + r"\1.\2"),
    Rule(rf"rpn\.head\.centerness\.({_WB})", _FCOS + r"ctrness.\1"),
    Rule(r"rpn\.head\.scales\.(\d+)\.scale", _FCOS + r"scales.\1.scale"),
    Rule(rf"rpn\.head\.mask_tower\.(\d+)\.({_WB})", r"embed_head.mask_tower.\1.\2"),
    Rule(
        rf"rpn\.head\.((?:pixel|proposal)_(?:spatial|other)_embed_pred|proposal_margin_pred)\."
        rf"({_WB})",
        r"embed_head.\1.\2",
    ),
    Rule(r"rpn\.head\.(margin_scales\.\d+|position_scale)\.scale", r"embed_head.\1.scale"),
)

#: AdelaiDet's backbone and FCOS keys are QuerySeg's.
_ADELAIDET_RULES = tuple(
    Rule(p, r"\g<0>")
    for p in (
        rf"backbone\.bottom_up\.stem\.conv1\.(?:weight|norm\.{_NORM})",
        rf"backbone\.bottom_up\.res[2-5]\.\d+\.(?:conv[1-3]|shortcut)\.(?:weight|norm\.{_NORM})",
        rf"backbone\.fpn_(?:lateral|output)[3-5]\.{_WB}",
        rf"backbone\.top_block\.p[67]\.{_WB}",
        rf"proposal_generator\.fcos_head\.(?:cls_tower|bbox_tower)\.\d+\.{_WB}",
        rf"proposal_generator\.fcos_head\.(?:cls_logits|bbox_pred|ctrness)\.{_WB}",
        r"proposal_generator\.fcos_head\.scales\.\d+\.scale",
    )
)

#: Modules of the AdelaiDet generation with no counterpart in QuerySeg's EmbedMask.
ADELAIDET_ONLY = {
    "mask_branch.": "CondInst-style mask branch (P3-P5 refine, 128-ch tower, semantic head)",
    "pixel_head.": "pixel embedding head on the 128-ch mask branch",
    "proposal_head.": "proposal embedding / margin head (1x1 reduce to 128 + EmbedHead)",
    "mask_pred.": "mask-prediction buffers (sizes_of_interest, _iter)",
}

_DROPPED = (Rule(r".*\.num_batches_tracked", None),)

#: eps of Detectron2's ``FrozenBatchNorm2d`` (and of ``nn.BatchNorm2d``), inside the sqrt.
D2_BN_EPS = 1e-5
_MRCNN_FROZEN_BN_VAR = re.compile(r"backbone\.body\..*\.running_var")


def frozen_bn_to_detectron2(
    state: Mapping[str, torch.Tensor], eps: float = D2_BN_EPS
) -> dict[str, torch.Tensor]:
    """``state`` with each maskrcnn-benchmark FrozenBatchNorm ``running_var`` (the ResNet's,
    ``backbone.body.*``) lowered by ``eps``: maskrcnn-benchmark computes
    ``weight * running_var.rsqrt()``, Detectron2 ``weight * (running_var + eps).rsqrt()``, so the
    converted BatchNorms scale as the official ones do (to float rounding)."""
    return {k: v - eps if _MRCNN_FROZEN_BN_VAR.fullmatch(k) else v for k, v in state.items()}


def detect_format(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"maskrcnn-benchmark"`` (``rpn.head.*``), ``"adelaidet"`` (``proposal_generator.*``)
    or ``None``."""
    if any(k.startswith("rpn.head.") for k in state):
        return "maskrcnn-benchmark"
    if any(k.startswith("proposal_generator.") for k in state):
        return "adelaidet"
    return None


def embedmask_generation(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Which maskrcnn-benchmark EmbedMask generation a state dict holds.

    Returns:
        ``{"generation": "v2" | "v1.5" | "v1" | None, "embed_dim": D | None}``, from
        ``rpn.head.proposal_margin_pred.weight``: [D, 256, 3, 3] with ``margin_scales`` (v2),
        [1, 256, 3, 3] (v1.5), a 1x1 conv on 4 channels (v1, margin from the predicted box).
    """
    margin = state.get("rpn.head.proposal_margin_pred.weight")
    other = state.get("rpn.head.pixel_other_embed_pred.weight")
    embed_dim = other.shape[0] + 2 if other is not None else None
    if margin is None or margin.dim() != 4:
        return {"generation": None, "embed_dim": embed_dim}
    if margin.shape[1] == 4 or margin.shape[-1] == 1:
        generation = "v1"
    elif margin.shape[0] == 1:
        generation = "v1.5"
    else:
        generation = "v2"
    return {"generation": generation, "embed_dim": embed_dim}


def model_overrides(state: Mapping[str, torch.Tensor]) -> list[str]:
    """``KEY VALUE`` overrides the QuerySeg model needs for this checkpoint (v1.5: D and the
    scalar margin; v2 with D != 16: D); empty for the default v2 model."""
    if detect_format(state) != "maskrcnn-benchmark":
        return []
    gen = embedmask_generation(state)
    opts = []
    if gen["embed_dim"] is not None and gen["embed_dim"] != 16:
        opts += ["MODEL.EMBEDMASK.EMBED_DIM", str(gen["embed_dim"])]
    if gen["generation"] == "v1.5":
        opts += ["MODEL.EMBEDMASK.MARGIN_PER_DIM", "False"]
    return opts


def default_config(state: Mapping[str, torch.Tensor]) -> str:
    """The QuerySeg COCO config for a checkpoint, from its ResNet depth (res4 block count)."""
    stage = r"backbone\.(?:body\.layer3|bottom_up\.res4)\.(\d+)\."
    blocks = {int(m.group(1)) for k in state if (m := re.match(stage, k))}
    depth = {6: 50, 23: 101}.get(len(blocks))
    if depth is None:
        raise CheckpointError(
            f"cannot tell the ResNet depth of this EmbedMask checkpoint ({len(blocks)} res4 "
            "blocks); pass --config-file"
        )
    return os.path.join(CONFIG_DIR, CONFIGS[depth])


def _refuse_modules(state: Mapping[str, torch.Tensor], groups: Mapping[str, str], why: str) -> None:
    """Raise listing every source key under ``groups`` (prefix -> what it is), if any."""
    found = {p: [k for k in state if k.startswith(p)] for p in groups}
    found = {p: keys for p, keys in found.items() if keys}
    if not found:
        return
    lines = [why]
    for prefix, keys in found.items():
        lines.append(f"  {prefix}* ({len(keys)} tensors): {groups[prefix]}")
        lines.extend(f"    {k} {tuple(state[k].shape)}" for k in keys)
    raise CheckpointError("\n".join(lines))


def embedmask_rules(fmt: str) -> list[Rule]:
    """Rules for one source format (see the module docstring)."""
    if fmt == "maskrcnn-benchmark":
        body = resnet_rules("backbone.body.", "backbone.bottom_up.")
        return [*_DROPPED, *_MRCNN_RULES, *body]
    if fmt == "adelaidet":
        return [*_DROPPED, *_ADELAIDET_RULES]
    raise ValueError(f"unknown EmbedMask checkpoint format {fmt!r} (one of {FORMATS})")


def convert(
    state: Mapping[str, torch.Tensor], args: Any = None, *, fmt: str | None = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert an official EmbedMask ``model`` state dict (``fmt`` or ``args.format``).

    Raises :class:`CheckpointError` when the state is of another format than the one asked for,
    or holds modules QuerySeg's EmbedMask does not have (the AdelaiDet generation's embedding
    part, a v1 margin), listing them.
    """
    fmt = fmt or getattr(args, "format", None) or FORMATS[0]
    found = detect_format(state)
    if found is not None and found != fmt:
        raise CheckpointError(
            f"the checkpoint is in the {found} layout, not {fmt}: pass --format {found}"
        )
    if fmt == "adelaidet":
        _refuse_modules(
            state,
            ADELAIDET_ONLY,
            "the AdelaiDet EmbedMask port's embedding part is another code generation than "
            "QuerySeg's EmbedMask (maskrcnn-benchmark v2, projects/embedmask/README.md); its "
            "embed_head would stay random. Modules with no counterpart:",
        )
    else:
        gen = embedmask_generation(state)
        if gen["generation"] == "v1":
            _refuse_modules(
                state,
                {"rpn.head.proposal_margin_pred.": "v1 margin: 1x1 conv on the predicted box"},
                "an EmbedMask v1 checkpoint (arXiv code, 2019-11..2020-02): its margin comes from "
                "the predicted (l, t, r, b); QuerySeg's EmbedMask has v2's per-dim margin and "
                "v1.5's scalar margin (3x3 conv on the box tower) only. Modules with no "
                "counterpart:",
            )
        state = frozen_bn_to_detectron2(state)
    return convert_state_dict(state, embedmask_rules(fmt))


def _config_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--config-file`` (when absent) and the model overrides the checkpoint needs
    (unless given) read off the source checkpoint."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("src", nargs="?")
    pre.add_argument("--config-file")
    pre.add_argument("--format")  # takes a value: must not be read as src
    pre.add_argument("--trust", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if not known.src or "-h" in argv or "--help" in argv:
        return argv
    state = extract_model_state(load_checkpoint_file(known.src, known.trust), known.src)
    if not known.config_file:
        config = default_config(state)
        sys.stdout.write(f"config read off the checkpoint: {os.path.relpath(config, REPO)}\n")
        argv = ["--config-file", config, *argv]
    opts = model_overrides(state)
    given = set(argv)
    opts = [x for key, val in zip(opts[::2], opts[1::2]) if key not in given for x in (key, val)]
    if opts:
        gen = embedmask_generation(state)["generation"]
        sys.stdout.write(f"EmbedMask {gen} checkpoint: the model needs {' '.join(opts)} (add them "
                         "to train_net.py too)\n")  # fmt: skip
        argv = [*argv, *opts]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return converter_main(
            "Convert an official EmbedMask checkpoint (yinghdb/EmbedMask maskrcnn-benchmark, or "
            "the AdelaiDet port: refused, another generation) to QuerySeg.",
            convert,
            None,
            _config_argv(argv),
            formats=FORMATS,
        )
    except CheckpointError as e:
        sys.stderr.write(f"{e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
