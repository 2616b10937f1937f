#!/usr/bin/env python
"""Export a QuerySeg model's inference core to ONNX or TorchScript, and check it against eager.

    python tools/export_model.py --config-file CFG --format onnx --output DIR [--check] \\
        [--sample-image IMG] [KEY VALUE ...]

As Detectron2's ``tools/deploy/export_model.py``: weights from ``MODEL.WEIGHTS`` (empty: random
initialisation), the graph traced on one real image (``--sample-image``, default the first image
of ``DATASETS.TEST[0]``, resized as the predictor does) and specialised to its padded size. What
is exported is the meta-architecture's ``inference_core`` (``common.modeling.export``): tensors in,
raw logits / masks / boxes out; the method's own post-processing turns a runtime's outputs into
Detectron2 instances, panoptic or semantic results (``load_core_postprocess`` below).

``--check`` runs the exported file (ONNX: onnxruntime's CPU provider; TorchScript: in a fresh
Python process) on that image and prints ``max abs diff: X`` of the raw outputs against eager
PyTorch, then the agreement of the final results. Writes DIR/model.onnx or DIR/model.ts and
DIR/outputs.txt (the output names, in order).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("queryseg.export")

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}

# a TorchScript file needs no QuerySeg code to run: only torch and torchvision's operators
_TS_CHILD = """
import sys, torch, torchvision  # noqa: F401  (torchvision registers roi_align)
model = torch.jit.load(sys.argv[1])
images, sizes = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(images, sizes)
torch.save(list(out), sys.argv[3])
"""


def setup_cfg(config_file: str, opts: Sequence[str] = ()):
    """The frozen config (the `shapes` dataset generated if the config names it)."""
    from common.data.shapes import configure_shapes_from_cfg
    from common.engine import get_cfg, merge_config, setup_queryseg

    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, config_file, list(opts))
    cfg.freeze()
    configure_shapes_from_cfg(cfg, generate=True)
    return cfg


def build_eval_model(cfg) -> torch.nn.Module:
    """The config's model in eval mode on its device, with ``MODEL.WEIGHTS`` (strict) or random."""
    from detectron2.modeling import build_model

    from common.engine.checkpoint import QSCheckpointer

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        QSCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("no MODEL.WEIGHTS: exporting a randomly initialised model")
    return model.eval()


def sample_inputs(cfg, image_path: str | None = None) -> list[dict[str, Any]]:
    """One Detectron2 input dict: ``image_path`` (default: the first image of
    ``DATASETS.TEST[0]``) read in ``INPUT.FORMAT`` and resized as ``DefaultPredictor`` does."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    if image_path is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("DATASETS.TEST is empty: pass --sample-image")
        dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])
        if not dicts:
            raise ValueError(f"dataset {cfg.DATASETS.TEST[0]!r} has no images: pass --sample-image")
        image_path = dicts[0]["file_name"]
    image = read_image(image_path, format=cfg.INPUT.FORMAT)
    height, width = image.shape[:2]
    aug = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    image = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    return [{"image": tensor, "height": height, "width": width, "file_name": image_path}]


def export(model, batched_inputs, fmt: str, output_dir: str) -> tuple[str, list[str]]:
    """Export ``model``'s core traced on ``batched_inputs``; returns (file, output names)."""
    from common.modeling.export import core_inputs, export_onnx, export_torchscript

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[fmt])
    images, sizes = core_inputs(model, batched_inputs)
    if fmt == "onnx":
        names = export_onnx(model, images.tensor, sizes, path)
    else:
        export_torchscript(model, images.tensor, sizes, path)
        names = list(model.core_output_names)
    with open(os.path.join(output_dir, "outputs.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return path, names


def run_exported(path: str, fmt: str, images, sizes, names: Sequence[str]) -> dict:
    """Raw outputs of an exported file: onnxruntime (CPU) or TorchScript in a fresh process."""
    from common.modeling.export import onnxruntime_session, run_onnxruntime

    if fmt == "onnx":
        return run_onnxruntime(onnxruntime_session(path), images, sizes, names)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save((images.cpu(), sizes.cpu()), inputs)
        subprocess.run([sys.executable, "-c", _TS_CHILD, path, inputs, outputs], check=True)
        values = torch.load(outputs)
    return dict(zip(names, values))


def check(model, batched_inputs, path: str, fmt: str, names: Sequence[str]) -> dict[str, Any]:
    """Eager vs the exported file on ``batched_inputs``: per-output max abs diffs of the raw
    outputs, and :func:`common.modeling.export.compare_results` of the final results (the
    model's post-processing applied to both)."""
    from common.modeling.export import compare_results, core_inputs, max_abs_diff

    with torch.no_grad():
        images, sizes = core_inputs(model, batched_inputs)
        eager = model.inference_core(images.tensor, sizes)
        eager = {k: eager[k] for k in names}
        runtime = run_exported(path, fmt, images.tensor, sizes, names)
        diffs = max_abs_diff(eager, runtime)
        device = images.tensor.device
        final_eager = model.core_postprocess(eager, batched_inputs, images)
        final_runtime = model.core_postprocess(
            {k: v.to(device) for k, v in runtime.items()}, batched_inputs, images
        )
    return {
        "diffs": diffs,
        "max_abs_diff": max(diffs.values()),
        "results": compare_results(final_eager, final_runtime),
        "eager": final_eager,
        "runtime": final_runtime,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--check", action="store_true", help="run the export and compare with eager")
    p.add_argument("--sample-image", help="image to trace on (default: DATASETS.TEST[0]'s first)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = setup_cfg(args.config_file, args.opts)
    model = build_eval_model(cfg)
    inputs = sample_inputs(cfg, args.sample_image)
    path, names = export(model, inputs, args.format, args.output)
    sys.stdout.write(f"exported {type(model).__name__} to {path} (outputs: {', '.join(names)})\n")
    if args.check:
        report = check(model, inputs, path, args.format, names)
        for name, diff in report["diffs"].items():
            sys.stdout.write(f"  {name}: max abs diff {diff:.3g}\n")
        sys.stdout.write(f"max abs diff: {report['max_abs_diff']:.3g}\n")
        agreement = ", ".join(f"{k} {v:.4g}" for k, v in report["results"].items())
        sys.stdout.write(f"final results: {agreement}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
