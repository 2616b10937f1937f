#!/usr/bin/env python
"""QuerySeg demo in Detectron2's style: a config and weights, images / a folder / a video / a
webcam in, Detectron2 Visualizer overlays (instance, panoptic or semantic) out.

    python demo/demo.py --config-file CFG.yaml --input img.jpg photos/ "more/*.png" \
        --output out/ --confidence-threshold 0.5 --opts MODEL.WEIGHTS model_final.pth
    python demo/demo.py --config-file CFG.yaml --weights w.pth --video-input v.mp4 --output o.mp4
    python demo/demo.py --config-file CFG.yaml --weights w.pth --webcam [--output cam.mp4]

A video model (online VIS, e.g. ``queryinst_vis_*.yaml``) tracks instances through a video file or
a folder of frames (one clip, frames in name order) and draws one colour per track::

    python demo/demo.py --config-file VIS.yaml --weights w.pth --clip-input frames/ --output out/
    python demo/demo.py --config-file VIS.yaml --weights w.pth --video-input v.mp4 --output o.mp4

Comparison mode: several configs (and one weight file each) -> per input, one labelled grid
"input | model 1 | model 2 | ..." written as ``<stem>_grid.jpg``::

    python demo/demo.py --config-file knet.yaml fastinst.yaml --weights k.pth f.pth \
        --labels K-Net FastInst --input img.jpg --output out/

An unreadable input image is reported (naming the file) and skipped; the others still run, and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from collections.abc import Sequence

import cv2
import numpy as np
import tqdm

if __package__:  # imported as ``demo.demo`` (the tests)
    from .predictor import (
        SegmentationDemo,
        VideoTrackDemo,
        compare_on_image,
        frames,
        is_video_model,
        output_path,
        render_frame,
        setup_cfg,
    )
else:  # run as a script: demo/ is sys.path[0], as in Detectron2's demo
    from predictor import (
        SegmentationDemo,
        VideoTrackDemo,
        compare_on_image,
        frames,
        is_video_model,
        output_path,
        render_frame,
        setup_cfg,
    )

logger = logging.getLogger("queryseg.demo")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINDOW = "QuerySeg"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file",
        nargs="+",
        required=True,
        metavar="FILE",
        help="one config, or several for the comparison grid",
    )
    p.add_argument("--weights", nargs="+", help="one checkpoint per config (else MODEL.WEIGHTS)")
    p.add_argument("--labels", nargs="+", help="grid labels, one per config (default: stems)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="image files, folders or glob patterns")
    src.add_argument("--video-input", help="a video file")
    src.add_argument("--webcam", action="store_true", help="camera 0")
    src.add_argument("--clip-input", help="a folder of frames of one clip (video models)")
    p.add_argument("--output", help="a folder (or one image/video file); default: show a window")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument(
        "--task",
        default="auto",
        choices=["auto", "instance", "panoptic", "semantic"],
        help="which output to draw (auto: panoptic, else instance, else semantic)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="the inference fast path (MODEL.FAST_INFERENCE: folded BatchNorm, channels-last, "
        "selected-queries post-processing; same results)",
    )
    p.add_argument("--grid-cols", type=int, help="panels per grid row (default: all in one)")
    p.add_argument("--max-frames", type=int, default=0, help="video/webcam: stop after N")
    p.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE config overrides, applied to every config",
    )
    return p


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image paths, error messages): folders give their images, patterns their matches."""
    paths, errors = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                errors.append(f"{item}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                errors.append(f"{item}: pattern matches no file")
            paths += found
        else:
            errors.append(f"{item}: no such file or folder")
    return paths, errors


def read_bgr(path: str):
    """[H,W,3] uint8 BGR image; raises DataError naming the file when it cannot be read."""
    from common.data.validation import read_image_checked

    return read_image_checked(path, "BGR")


def build_demos(args: argparse.Namespace) -> list[SegmentationDemo]:
    configs = args.config_file
    for flag in ("weights", "labels"):
        given = getattr(args, flag)
        if given and len(given) != len(configs):
            raise SystemExit(f"--{flag}: {len(given)} values for {len(configs)} --config-file")
    weights = args.weights or [None] * len(configs)
    labels = args.labels or [os.path.splitext(os.path.basename(c))[0] for c in configs]
    demos = []
    for cfg_file, w, label in zip(configs, weights, labels):
        opts = [*args.opts, "MODEL.FAST_INFERENCE", "True"] if args.fast else args.opts
        cfg = setup_cfg(cfg_file, w, opts, args.confidence_threshold)
        demos.append(
            SegmentationDemo(
                cfg, label=label, task=args.task, confidence_threshold=args.confidence_threshold
            )
        )
    return demos


def write_image(path: str, image_bgr) -> None:
    """Encode ``image_bgr`` ([H,W,3] uint8) by ``path``'s extension and write it atomically
    (temporary file, then rename): a failure raises naming ``path`` and leaves nothing half
    written (``cv2.imwrite`` returns False instead of raising)."""
    ext = os.path.splitext(path)[1] or ".png"
    try:
        ok, buf = cv2.imencode(ext, image_bgr)
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f"cannot encode an image as {ext!r} for {path}")
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(buf.tobytes())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None


def show(image_bgr) -> bool:
    """Show a frame in a window; False when the user pressed Esc."""
    try:
        cv2.imshow(WINDOW, image_bgr)
    except cv2.error as e:
        raise SystemExit(f"cannot open a window ({e.err}); pass --output to write files") from None
    return cv2.waitKey(1) != 27


def run_images(demos: list[SegmentationDemo], args: argparse.Namespace) -> int:
    """Overlay (or compare) every input image; returns the number of failed inputs."""
    paths, errors = expand_inputs(args.input)
    compare = len(demos) > 1
    if args.output and not os.path.splitext(args.output)[1]:
        os.makedirs(args.output, exist_ok=True)
    written = 0
    for path in tqdm.tqdm(paths, disable=not args.output, desc="images"):
        try:
            image = read_bgr(path)
        except ValueError as e:  # DataError: the file is missing, truncated or not an image
            errors.append(str(e))
            logger.error("%s", e)
            continue
        start = time.perf_counter()
        if compare:
            rgb = compare_on_image(demos, image, args.grid_cols)
            what = f"{len(demos)} models"
        else:
            outputs, rgb = demos[0].run_on_image(image)
            what = demos[0].drawn_task(outputs)
        logger.info("%s: %s in %.2fs", path, what, time.perf_counter() - start)
        if args.output:
            out = output_path(args.output, path, "_grid" if compare else "")
            try:
                write_image(out, rgb[:, :, ::-1])
            except (OSError, ValueError) as e:
                errors.append(str(e))
                logger.error("%s", e)
                continue
            written += 1
        elif not show(rgb[:, :, ::-1].copy()) or cv2.waitKey(0) == 27:
            break
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        print(
            f"error: {len(errors)} input(s) failed; {written} overlay(s) written", file=sys.stderr
        )
    return len(errors)


def run_video(demos: list[SegmentationDemo], args: argparse.Namespace) -> int:
    """Overlay a video file or the webcam, frame by frame (to --output, else a window)."""
    source = 0 if args.webcam else args.video_input
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        print(f"error: cannot open video source {source!r}", file=sys.stderr)
        return 1
    fps = capture.get(cv2.CAP_PROP_FPS) or 15.0
    writer = None
    try:
        for frame in tqdm.tqdm(
            frames(capture, args.max_frames), disable=not args.output, desc="frames"
        ):
            out = render_frame(demos, frame, args.grid_cols)
            if args.output:
                if writer is None:
                    path = args.output
                    if os.path.isdir(path) or not os.path.splitext(path)[1]:
                        name = "webcam" if args.webcam else os.path.basename(args.video_input)
                        os.makedirs(path, exist_ok=True)
                        path = os.path.join(path, os.path.splitext(name)[0] + ".mp4")
                    h, w = out.shape[:2]
                    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                    if not writer.isOpened():
                        print(
                            f"error: cannot write video {path} (unwritable folder, or no mp4v "
                            "encoder for this extension)",
                            file=sys.stderr,
                        )
                        return 1
                writer.write(out)
            elif not show(out):
                break
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    return 0


def read_clip(args: argparse.Namespace) -> tuple[list, list[str], float]:
    """(BGR frames, output names, fps) of --clip-input (a folder) or --video-input (a file)."""
    if args.clip_input:
        paths, errors = expand_inputs([args.clip_input])
        if errors:
            raise SystemExit(f"error: {'; '.join(errors)}")
        paths = paths[: args.max_frames] if args.max_frames > 0 else paths
        return [read_bgr(p) for p in paths], [os.path.basename(p) for p in paths], 10.0
    capture = cv2.VideoCapture(args.video_input)
    if not capture.isOpened():
        raise SystemExit(f"error: cannot open video source {args.video_input!r}")
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) or 15.0
        clip = list(frames(capture, args.max_frames))
    finally:
        capture.release()
    return clip, [f"{i:05d}.jpg" for i in range(len(clip))], fps


def run_tracking(args: argparse.Namespace) -> int:
    """A video model over a clip: overlays with one colour per track, written as images (a
    folder, for --clip-input) or a video (--video-input), else shown."""
    if len(args.config_file) != 1:
        raise SystemExit("error: a video model runs alone (one --config-file)")
    weights = args.weights[0] if args.weights else None
    cfg = setup_cfg(args.config_file[0], weights, args.opts, args.confidence_threshold)
    demo = VideoTrackDemo(cfg, confidence_threshold=args.confidence_threshold)
    clip, names, fps = read_clip(args)
    start = time.perf_counter()
    per_frame, overlays = demo.run_on_frames(clip)
    tracks = {int(t) for inst in per_frame for t in inst.track_ids}
    logger.info(
        "%d frames, %d tracks in %.2fs", len(clip), len(tracks), time.perf_counter() - start
    )
    if not args.output:
        for rgb in overlays:
            if not show(rgb[:, :, ::-1].copy()):
                break
        return 0
    if args.video_input and os.path.splitext(args.output)[1]:
        h, w = overlays[0].shape[:2] if overlays else (1, 1)
        writer = cv2.VideoWriter(args.output, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if not writer.isOpened():
            print(f"error: cannot write video {args.output}", file=sys.stderr)
            return 1
        for rgb in overlays:
            writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
        writer.release()
        return 0
    for name, rgb in zip(names, overlays):
        write_image(output_path(args.output, name), rgb[:, :, ::-1])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(name)s] %(message)s")
    if args.clip_input or (args.video_input and _is_video_config(args)):
        return run_tracking(args)
    demos = build_demos(args)
    if args.input:
        return 1 if run_images(demos, args) else 0
    return run_video(demos, args)


def _is_video_config(args: argparse.Namespace) -> bool:
    cfg = setup_cfg(args.config_file[0], None, args.opts, args.confidence_threshold)
    return is_video_model(cfg)


if __name__ == "__main__":
    sys.exit(main())
