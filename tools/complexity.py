#!/usr/bin/env python
"""Parameters and inference GFLOPs of any QuerySeg / baseline config, as one Markdown table.

    python tools/complexity.py                          # every COCO / ADE20K / shapes config
    python tools/complexity.py --configs A.yaml B.yaml [--size H W] [--no-flops] [KEY VALUE ...]
    python tools/complexity.py --glob 'projects/knet/configs/*.yaml' --output docs/knet_cost.md

GFLOPs: fvcore's count (one multiply-add = one FLOP, as the papers count) of one eval-mode
forward on a random image at the config's own test size — COCO ``MIN_SIZE_TEST`` x
``MAX_SIZE_TEST`` (800 x 1333 unless the config says otherwise), ADE20K the crop size, `shapes`
128 x 128 — unless ``--size`` is given; attention products are counted as
``tools/bench_measure.py`` counts them, ops fvcore has no handle for (RoIAlign, deformable
attention/convolution, top-k, grid sampling) are not, and are listed under the table. Random
weights: data-dependent parts (how many queries reach a mask head) run at their upper bound.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from detectron2.modeling import build_model  # noqa: E402

from common.engine import Trainer, get_cfg, merge_config, setup_queryseg  # noqa: E402

if __package__:  # imported as ``tools.<name>`` (the tests, another tool)
    from .bench_measure import FLOP_COUNTER_FALLBACK, count_gflops, count_parameters
else:  # run as a script: tools/ is sys.path[0] (Detectron2 installs a package `tools`)
    from bench_measure import FLOP_COUNTER_FALLBACK, count_gflops, count_parameters

DEFAULT_GLOBS = (
    "projects/*/configs/*_coco*.yaml",
    "projects/*/configs/*ade20k*.yaml",
    "projects/*/configs/shapes/*.yaml",
    "common/configs/baselines/*_shapes.yaml",
)


def test_size(cfg) -> tuple[int, int]:
    """(H, W) of the config's test input: semantic crop configs use the crop, others
    MIN_SIZE_TEST x MAX_SIZE_TEST (a COCO-like landscape image at the test scale)."""
    short = cfg.INPUT.MIN_SIZE_TEST
    if cfg.INPUT.DATASET_MAPPER_NAME == "semantic" and cfg.INPUT.CROP.ENABLED:
        h, w = cfg.INPUT.CROP.SIZE
        return int(h), int(w)
    if any("shapes" in n for n in cfg.DATASETS.TEST):
        return short, short
    return short, max(short, cfg.INPUT.MAX_SIZE_TEST)


def measure(config: str, size: tuple[int, int] | None, flops: bool, opts: list[str]) -> dict:
    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    Trainer.dry_check_config(cfg)  # a key that changes nothing is an error, not a wrong count
    model = build_model(cfg).eval()
    h, w = size or test_size(cfg)
    row = {"config": os.path.relpath(config, REPO), "params": count_parameters(model) / 1e6,
           "size": f"{h}x{w}", "gflops": None, "uncounted": {}}  # fmt: skip
    if flops:
        torch.manual_seed(0)
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        row["gflops"], row["uncounted"] = count_gflops(model, [{"image": image}])
    return row


def table(rows: list[dict]) -> str:
    lines = ["| config | params (M) | input | GFLOPs |", "|:---|---:|:---|---:|"]
    for r in rows:
        g = "—" if r["gflops"] is None else f"{r['gflops']:.1f}"
        g += " †" if FLOP_COUNTER_FALLBACK in r["uncounted"] else ""
        lines.append(f"| `{r['config']}` | {r['params']:.2f} | {r['size']} | {g} |")
    uncounted = sorted({op for r in rows for op in r["uncounted"]} - {FLOP_COUNTER_FALLBACK})
    if any(FLOP_COUNTER_FALLBACK in r["uncounted"] for r in rows):
        lines += ["", "† the randomly initialised model's output does not depend on the "
                  "computation (e.g. an empty panoptic map), which empties fvcore's trace: "
                  "counted with torch's FlopCounterMode (multiply-adds) instead"]  # fmt: skip
    if uncounted:
        lines += ["", "Not counted (no fvcore handle): " + ", ".join(f"`{o}`" for o in uncounted)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", help="config files (default: --glob)")
    parser.add_argument("--glob", nargs="+", default=list(DEFAULT_GLOBS),
                        help="repo-relative patterns when --configs is not given")  # fmt: skip
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--no-flops", action="store_true", help="parameters only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", help="also write the table to this Markdown file")
    parser.add_argument("opts", nargs="*", help="KEY VALUE overrides for every config")
    args = parser.parse_intermixed_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    logging.getLogger("detectron2").setLevel(logging.ERROR)
    configs = args.configs or sorted(
        {f for pat in args.glob for f in glob.glob(os.path.join(REPO, pat))}
    )
    if not configs:
        parser.error("no config matched")
    rows = []
    for i, config in enumerate(configs, 1):
        row = measure(os.path.abspath(config), tuple(args.size) if args.size else None,
                      not args.no_flops, list(args.opts))  # fmt: skip
        rows.append(row)
        g = "" if row["gflops"] is None else f", {row['gflops']:.1f} GFLOPs @ {row['size']}"
        print(f"[{i}/{len(configs)}] {row['config']}: {row['params']:.2f} M{g}", flush=True)
    out = table(rows)
    print(out)
    if args.output:
        with open(args.output, "w") as f:
            f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
