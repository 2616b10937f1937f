#!/usr/bin/env python
"""FastInst inference speed on the CPU (random weights): seconds per image, batch 1.

For each config, builds the model (no weights), feeds one random image of the official test size
(D1: 576 x 777, D3: 640 x 853, i.e. a COCO image resized to short side 576/640, max 777/853) with
``height``/``width`` set, runs ``--warmup`` untimed passes, then reports the median and the
min of ``--iters`` timed passes of the full model (backbone, PPM-FPN, decoder, instance
post-processing at the output size). Also prints the parameter count and, with ``--flops``, the
fvcore GFLOPs of one pass at that size.

    python tools/bench_fastinst.py                     # FastInst-D1 and -D3, R50
    python tools/bench_fastinst.py --threads 1 --iters 5 --flops
    python tools/bench_fastinst.py --all --flops --iters 0     # params and GFLOPs of all six
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from detectron2.modeling import build_model  # noqa: E402

from common.engine import get_cfg, merge_config, setup_queryseg  # noqa: E402

_C = "projects/fastinst/configs/"
CONFIGS = {
    "FastInst-D1 R50": (_C + "fastinst_R50_ppm-fpn_D1_576_50ep_coco.yaml", (576, 777)),
    "FastInst-D3 R50": (_C + "fastinst_R50_ppm-fpn_D3_640_50ep_coco.yaml", (640, 853)),
}
MORE_CONFIGS = {  # --all
    "FastInst-D1 R101": (_C + "fastinst_R101_ppm-fpn_D1_576_50ep_coco.yaml", (576, 777)),
    "FastInst-D3 R101": (_C + "fastinst_R101_ppm-fpn_D3_640_50ep_coco.yaml", (640, 853)),
    "FastInst-D1 R50-d-DCN": (_C + "fastinst_R50-d-DCN_ppm-fpn_D1_576_50ep_coco.yaml", (576, 777)),
    "FastInst-D3 R50-d-DCN": (_C + "fastinst_R50-d-DCN_ppm-fpn_D3_640_50ep_coco.yaml", (640, 853)),
}


def build(config: str, opts: list[str]) -> torch.nn.Module:
    setup_queryseg()
    cfg = get_cfg()
    merge_config(
        cfg, os.path.join(REPO, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts]
    )
    model = build_model(cfg)
    return model.eval()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _sdpa_flops(inputs, outputs) -> int:
    """scaled_dot_product_attention: Q K^T and (softmax) V, one multiply-add each."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _deform_conv_flops(inputs, outputs) -> int:
    """torchvision deform_conv2d: as a convolution of the same shapes (sampling not counted)."""
    from fvcore.nn.jit_handles import get_shape

    weight, out = get_shape(inputs[1]), get_shape(outputs[0])
    return _numel(out) * _numel(weight[1:])


def gflops(model: torch.nn.Module, inputs: list[dict]) -> float:
    """fvcore FLOPs (one fused multiply-add = one flop, as detectron2/FastInst report), with
    handles for the fused attention and torchvision's deformable convolution."""
    from detectron2.utils.analysis import FlopCountAnalysis

    counter = FlopCountAnalysis(model, inputs)
    counter.set_op_handle(
        "aten::scaled_dot_product_attention",
        _sdpa_flops,
        "torchvision::deform_conv2d",
        _deform_conv_flops,
    )
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return counter.total() / 1e9


def bench(model: torch.nn.Module, size: tuple[int, int], warmup: int, iters: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
    inputs = [{"image": image, "height": size[0], "width": size[1]}]
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start = time.perf_counter()
            model(inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--flops", action="store_true", help="also count GFLOPs (fvcore)")
    parser.add_argument("--all", action="store_true", help="also R101 and R50-d-DCN")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch 1")
    print("| model | input (h x w) | params (M) | GFLOPs | median s/img | min s/img |")
    print("|---|---|---|---|---|---|")
    configs = {**CONFIGS, **(MORE_CONFIGS if args.all else {})}
    for name, (config, size) in configs.items():
        model = build(config, args.opts)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        flops = "-"
        if args.flops:
            image = torch.zeros(3, *size, dtype=torch.uint8)
            flops = f"{gflops(model, [{'image': image}]):.1f}"
        times = bench(model, size, args.warmup, args.iters) if args.iters > 0 else [float("nan")]
        print(
            f"| {name} | {size[0]} x {size[1]} | {params:.1f} | {flops} | "
            f"{statistics.median(times):.3f} | {min(times):.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
