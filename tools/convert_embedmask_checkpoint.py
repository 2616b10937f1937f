#!/usr/bin/env python
"""Convert an official EmbedMask v2 checkpoint (yinghdb/EmbedMask, maskrcnn-benchmark) to QuerySeg.

The result loads into ``projects/embedmask/configs/embedmask_R*_coco.yaml`` with
``MODEL.WEIGHTS <out>.pth``. Usage::

    python tools/convert_embedmask_checkpoint.py embedmask_R50_1x.pth embedmask_R50_1x_qs.pth

Only names change (the module layout was kept the same, see projects/embedmask/README.md);
solver state is dropped. Keys the mapping does not know raise an error instead of being dropped.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

import torch

_FPN_NAMES = {"inner": "fpn_lateral", "layer": "fpn_output"}

#: (pattern, replacement) applied in order to every key, after the index-shifting renames.
RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.body\.stem\.bn1\.", "backbone.bottom_up.stem.conv1.norm."),
    (r"^backbone\.body\.stem\.", "backbone.bottom_up.stem."),
    (r"(res\d\.\d+)\.downsample\.0\.", r"\1.shortcut."),
    (r"(res\d\.\d+)\.downsample\.1\.", r"\1.shortcut.norm."),
    (r"(res\d\.\d+)\.bn(\d)\.", r"\1.conv\2.norm."),
    (r"^backbone\.fpn\.top_blocks\.", "backbone.top_block."),
    (r"^rpn\.head\.centerness\.", "proposal_generator.fcos_head.ctrness."),
    (
        r"^rpn\.head\.(cls_tower|bbox_tower|cls_logits|bbox_pred|scales)\.",
        r"proposal_generator.fcos_head.\1.",
    ),
    (r"^rpn\.head\.", "embed_head."),
)
_KNOWN = ("backbone.bottom_up.", "backbone.fpn_", "backbone.top_block.", "proposal_generator.",
          "embed_head.")  # fmt: skip


def convert_key(key: str) -> str:
    """Map one maskrcnn-benchmark EmbedMask v2 key to its QuerySeg name (``module.`` stripped).

    ResNet ``layerN`` becomes ``res{N+1}``; FPN ``fpn_{inner,layer}I`` (built on C_{I+1})
    becomes ``fpn_{lateral,output}{I+1}``.
    """
    new = key.removeprefix("module.")
    new = re.sub(
        r"^backbone\.body\.layer(\d)\.",
        lambda m: f"backbone.bottom_up.res{int(m.group(1)) + 1}.",
        new,
    )
    new = re.sub(
        r"^backbone\.fpn\.fpn_(inner|layer)(\d)\.",
        lambda m: f"backbone.{_FPN_NAMES[m.group(1)]}{int(m.group(2)) + 1}.",
        new,
    )
    for pattern, repl in RULES:
        new = re.sub(pattern, repl, new)
    if not new.startswith(_KNOWN):
        raise KeyError(f"no EmbedMask v2 -> QuerySeg rule for checkpoint key {key!r}")
    return new


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of a v2 ``model`` state dict. Returns a new dict."""
    return {convert_key(k): v for k, v in state.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official .pth (a dict with 'model')")
    parser.add_argument("dst", help="output .pth for MODEL.WEIGHTS")
    args = parser.parse_args()
    ckpt = torch.load(args.src, map_location="cpu", weights_only=False)
    state = ckpt["model"] if "model" in ckpt else ckpt
    torch.save({"model": convert_state_dict(state), "__author__": "EmbedMask v2"}, args.dst)
    print(f"wrote {len(state)} tensors to {args.dst}")


if __name__ == "__main__":
    main()
