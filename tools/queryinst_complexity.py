#!/usr/bin/env python
"""Parameter counts (total and per part) and inference GFLOPs of QueryInst configs.

    python tools/queryinst_complexity.py --size 800 1333 [--no-flops] \
        --config-file projects/queryinst/configs/queryinst_R50_FPN_1x_coco.yaml [KEY VALUE ...]

GFLOPs are fvcore's count through Detectron2's tracing adapter (one multiply-add = one flop) of
one inference on a random image of the given size (padded to 32); RoIAlign, grid-sample mask
pasting and the top-k are not counted; the mask head runs on the distinct queries among the
top-k, as in the model (with random weights: about all queries).
"""

from __future__ import annotations

import argparse
import logging

import torch
from detectron2.modeling import build_model

from common.engine import Trainer, get_cfg, merge_config, setup_queryseg


def count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *args.opts])
    Trainer.dry_check_config(cfg)  # a key that changes nothing is an error, not a wrong count
    model = build_model(cfg).eval()
    roi = model.roi_head
    print(f"config: {args.config_file}")
    print(
        f"params: total {count(model):.2f}M | backbone+FPN {count(model.backbone):.2f}M | "
        f"proposals {count(model.rpn_head):.3f}M | {roi.num_stages} x DIIHead "
        f"{count(roi.bbox_head[0]):.2f}M | {roi.num_stages} x mask head "
        f"{count(roi.mask_head[0]):.2f}M"
    )
    if args.no_flops:
        return
    from detectron2.utils.analysis import FlopCountAnalysis

    h, w = args.size
    image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
    with torch.no_grad():
        flops = FlopCountAnalysis(model, [{"image": image}])
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = flops.total() / 1e9
        by_module = flops.by_module()
    backbone = next((v for k, v in by_module.items() if k.split(".")[-1] == "backbone"), 0)
    parts = {"backbone": backbone / 1e9, "roi_head": 0.0}
    parts["roi_head"] = total - parts["backbone"]
    print(
        f"GFLOPs @ {h}x{w}: {total:.1f} (backbone+FPN {parts['backbone']:.1f}, "
        f"heads {parts['roi_head']:.1f})"
    )


if __name__ == "__main__":
    main()
