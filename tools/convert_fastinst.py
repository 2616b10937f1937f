#!/usr/bin/env python
"""Convert an official FastInst checkpoint (junjiehe96/FastInst, release v0.1.0) to QuerySeg.

Usage::

    python tools/convert_fastinst.py fastinst_R50_ppm-fpn_x1_576_34.9.pth fastinst_R50_D1_qs.pth
    python train_net.py --config-file \
        projects/fastinst/configs/fastinst_R50_ppm-fpn_D1_576_50ep_coco.yaml \
        --eval-only MODEL.WEIGHTS fastinst_R50_D1_qs.pth

Without ``--config-file`` the QuerySeg config is read off the checkpoint (backbone depth, ResNet-d
deep stem, number of decoder layers; D1 is tested at 576 and D3 at 640 as in the release names)
and the converted weights are checked against the model it builds; nothing is written unless
every key maps with the model's shape.

Key layout (spec ``fastinst_embedmask_ops.md`` A.12/A.13): QuerySeg's FastInst keeps the official
module names, so the head (``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``) and the
Detectron2 R50/R101 backbone map unchanged; the attention weights keep
``nn.MultiheadAttention``'s packed ``in_proj`` layout (q, k, v row blocks) and both class heads
keep the order (80 COCO classes in Detectron2's order, no-object last), so no tensor is reshaped.
The R50-d-DCN backbone is FastInst's timm-style ResNet-D (``conv1.{0,3,6}``, ``bn1``,
``layerN.i.{convK,bnK,conv2_offset}``, ``downsample.{1,2}``) and is renamed to
``common.modeling.backbones.resnet_vd`` (Detectron2 names) by
:func:`common.convert.rules.resnet_rules`.
Dropped on purpose: the criterion's ``empty_weight`` buffer (registered twice, as
``criterion.empty_weight`` and ``sem_seg_head.predictor.criterion.empty_weight``; a loss constant
QuerySeg rebuilds from ``MODEL.FASTINST.NO_OBJECT_WEIGHT``) and BatchNorm ``num_batches_tracked``
counters (the backbone norm is FrozenBN); the solver state is never read.
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

CONFIG_DIR = os.path.join(REPO, "projects", "fastinst", "configs")

#: The official release (GitHub v0.1.0) and the QuerySeg config each file converts for.
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    src: f"fastinst_{dst}_50ep_coco.yaml"
    for src, dst in (
        ("fastinst_R50_ppm-fpn_x1_576_34.9.pth", "R50_ppm-fpn_D1_576"),
        ("fastinst_R50_ppm-fpn_x3_640_37.9.pth", "R50_ppm-fpn_D3_640"),
        ("fastinst_R101_ppm-fpn_x3_640_38.9.pth", "R101_ppm-fpn_D3_640"),
        ("fastinst_R50-vd-dcn_ppm-fpn_x1_576_37.4.pth", "R50-d-DCN_ppm-fpn_D1_576"),
        ("fastinst_R50-vd-dcn_ppm-fpn_x3_640_40.1.pth", "R50-d-DCN_ppm-fpn_D3_640"),
    )
}

_NORM = r"norm\.(?:weight|bias|running_mean|running_var)"
_ATTN = r"(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_WB = r"(?:weight|bias)"

#: Pixel decoder and transformer decoder: official name = QuerySeg name (spec A.13).
_HEAD_PATTERNS = (
    rf"sem_seg_head\.pixel_decoder\.(?:adapter|layer)_[1-3]\.(?:weight|norm\.{_WB})",
    rf"sem_seg_head\.pixel_decoder\.ppm\.stages\.[0-3]\.1\.{_WB}",
    rf"sem_seg_head\.pixel_decoder\.ppm\.bottleneck\.{_WB}",
    r"sem_seg_head\.predictor\.meta_pos_embed",
    r"sem_seg_head\.predictor\.empty_query_(?:features|pos_embed)\.weight",
    rf"sem_seg_head\.predictor\.query_proposal\.conv_proposal_cls_logits\.[02]\.{_WB}",
    rf"sem_seg_head\.predictor\.transformer_(?:query|mask)_cross_attention_layers\.\d+\."
    rf"(?:multihead_attn\.{_ATTN}|norm\.{_WB})",
    rf"sem_seg_head\.predictor\.transformer_query_self_attention_layers\.\d+\."
    rf"(?:self_attn\.{_ATTN}|norm\.{_WB})",
    rf"sem_seg_head\.predictor\.transformer_(?:query|mask)_ffn_layers\.\d+\."
    rf"(?:linear1|linear2|norm)\.{_WB}",
    rf"sem_seg_head\.predictor\.decoder_query_norm_layers\.\d+\.{_WB}",
    rf"sem_seg_head\.predictor\.(?:class|mask)_embed_layers\.\d+\.layers\.[0-2]\.{_WB}",
    rf"sem_seg_head\.predictor\.mask_features_layers\.\d+\.{_WB}",
)

#: Detectron2 ResNet (the R50 / R101 releases): official name = QuerySeg name.
_D2_RESNET_PATTERNS = (
    rf"backbone\.stem\.conv1\.(?:weight|{_NORM})",
    rf"backbone\.res[2-5]\.\d+\.(?:conv[1-3]|shortcut)\.(?:weight|{_NORM})",
)

_DROPPED = (
    # the criterion's class weights, once as the meta-arch's ``criterion`` and once as the
    # decoder's ``criterion`` attribute (the same module); rebuilt from NO_OBJECT_WEIGHT
    Rule(r"criterion\.empty_weight", None),
    Rule(r"sem_seg_head\.predictor\.criterion\.empty_weight", None),
    Rule(r"backbone\..*\.num_batches_tracked", None),
)


def source_layout(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What an official FastInst state dict holds.

    Returns:
        ``{"resnet_d": bool, "depth": int | None, "dec_layers": int}``: ``resnet_d`` for the
        R50-d-DCN release (timm-style deep stem ``backbone.conv1.0``), ``depth`` from the number
        of res4 blocks (6: 50, 23: 101), ``dec_layers`` from the transformer layers.
    """
    resnet_d = "backbone.conv1.0.weight" in state
    stage = r"backbone\.layer3\.(\d+)\." if resnet_d else r"backbone\.res4\.(\d+)\."
    blocks = {int(m.group(1)) for k in state if (m := re.match(stage, k))}
    depth = {6: 50, 23: 101, 36: 152}.get(len(blocks))
    layers = {
        int(m.group(1))
        for k in state
        if (m := re.match(r"sem_seg_head\.predictor\.transformer_query_ffn_layers\.(\d+)\.", k))
    }
    return {"resnet_d": resnet_d, "depth": depth, "dec_layers": len(layers)}


def default_config(state: Mapping[str, torch.Tensor]) -> str:
    """The QuerySeg COCO config a FastInst checkpoint belongs to, read off its keys.

    Raises :class:`CheckpointError` when no config fits (pass ``--config-file`` then).
    """
    lay = source_layout(state)
    backbone = "R50-d-DCN" if lay["resnet_d"] and lay["depth"] == 50 else f"R{lay['depth']}"
    size = {1: 576, 3: 640}.get(lay["dec_layers"], 640)
    name = f"fastinst_{backbone}_ppm-fpn_D{lay['dec_layers']}_{size}_50ep_coco.yaml"
    path = os.path.join(CONFIG_DIR, name)
    if lay["depth"] is None or not os.path.isfile(path):
        raise CheckpointError(
            f"cannot tell which QuerySeg config this FastInst checkpoint needs ({lay}; looked for "
            f"{os.path.relpath(path, REPO)}); pass --config-file"
        )
    return path


def fastinst_rules(state: Mapping[str, torch.Tensor]) -> list[Rule]:
    """Rules for an official FastInst state dict (the backbone rules follow its layout)."""
    rules = list(_DROPPED)
    if source_layout(state)["resnet_d"]:
        rules += resnet_rules("backbone.", "backbone.", deep_stem=True, avg_down=True)
    else:
        rules += [Rule(p, r"\g<0>") for p in _D2_RESNET_PATTERNS]
    rules += [Rule(p, r"\g<0>") for p in _HEAD_PATTERNS]
    return rules


def convert(
    state: Mapping[str, torch.Tensor], args: Any = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert an official FastInst ``model`` state dict to QuerySeg's FastInst keys.

    Returns the converted dict and the report of unmapped / duplicated keys (the model check is
    :func:`common.convert.core.check_against_model`). ``args`` (the CLI namespace) is unused.
    """
    return convert_state_dict(state, fastinst_rules(state))


def _config_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--config-file`` read off the source checkpoint when it has none."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("src", nargs="?")
    pre.add_argument("--config-file")
    pre.add_argument("--trust", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.config_file or not known.src or "-h" in argv or "--help" in argv:
        return argv
    state = extract_model_state(load_checkpoint_file(known.src, known.trust), known.src)
    config = default_config(state)
    sys.stdout.write(f"config read off the checkpoint: {os.path.relpath(config, REPO)}\n")
    return ["--config-file", config, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return converter_main(
            "Convert an official FastInst checkpoint (junjiehe96/FastInst v0.1.0) to QuerySeg "
            "(config read off the checkpoint unless --config-file is given).",
            convert,
            None,
            _config_argv(argv),
        )
    except CheckpointError as e:
        sys.stderr.write(f"{e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
