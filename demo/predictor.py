"""Predictor helpers of ``demo/demo.py``: config + weights -> a model that turns a BGR image (or
video frames) into Detectron2 Visualizer overlays, for any QuerySeg method or baseline."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor

from common.engine.checkpoint import QSCheckpointer
from common.engine.visualization import choose_task, draw_predictions, labelled_grid

logger = logging.getLogger("queryseg.demo")


def setup_cfg(
    config_file: str,
    weights: str | None = None,
    opts: Sequence[str] = (),
    confidence_threshold: float = 0.5,
) -> CfgNode:
    """The frozen config of one demo model.

    Sets Detectron2's own score thresholds (Mask R-CNN, RetinaNet, Panoptic FPN) to
    ``confidence_threshold`` as Detectron2's demo does; query-based heads are thresholded on
    their output scores when drawing. Registers the `shapes` dataset names (metadata only).
    """
    from common.data.shapes import configure_shapes_from_cfg
    from common.engine import Trainer, get_cfg, merge_config, setup_queryseg

    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, config_file, list(opts))
    Trainer.dry_check_config(cfg)  # every key given must be used by the model (no silent no-op)
    if weights:
        cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = confidence_threshold
    cfg.freeze()
    configure_shapes_from_cfg(cfg, generate=False)
    return cfg


class SegmentationDemo:
    """One model of the demo: predictions and their overlays for BGR images."""

    def __init__(
        self,
        cfg: CfgNode,
        *,
        label: str = "",
        task: str = "auto",
        confidence_threshold: float = 0.5,
    ):
        """
        Args:
            cfg: from :func:`setup_cfg` (``MODEL.WEIGHTS`` empty: random weights, with a warning).
            label: the name shown above this model's panel in comparison grids.
            task: which output to draw ("auto" | "instance" | "panoptic" | "semantic").
            confidence_threshold: instances scored below it are not drawn.
        """
        if not cfg.MODEL.WEIGHTS:
            logger.warning("%s: no MODEL.WEIGHTS given: the model has random weights", label)
        self.cfg = cfg
        self.label = label
        self.task = task
        self.threshold = confidence_threshold
        names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")
        # DefaultPredictor's own loading warns and goes on when weights do not fit; build it
        # without weights and load them with QuerySeg's strict, weights_only checkpointer.
        bare = cfg.clone()
        bare.defrost()
        bare.MODEL.WEIGHTS = ""
        bare.freeze()
        self.predictor = DefaultPredictor(bare)
        if cfg.MODEL.WEIGHTS:
            QSCheckpointer.from_config(cfg, self.predictor.model).load(cfg.MODEL.WEIGHTS)
        if cfg.MODEL.FAST_INFERENCE:  # after the weights: folding changes them
            from common.modeling.fast_inference import prepare_fast_inference

            prepare_fast_inference(self.predictor.model)

    def run_on_image(self, image_bgr: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """Predict and draw.

        Args:
            image_bgr: [H,W,3] uint8 BGR image (as OpenCV reads it).
        Returns:
            (the model's output dict at [H,W], [H,W,3] uint8 RGB overlay).
        """
        outputs = self.predictor(image_bgr)
        overlay = draw_predictions(
            image_bgr[:, :, ::-1],
            outputs,
            self.metadata,
            task=self.task,
            score_threshold=self.threshold,
        )
        return outputs, overlay

    def drawn_task(self, outputs: dict[str, Any]) -> str:
        """Which task :meth:`run_on_image` drew for these outputs."""
        return choose_task(outputs, self.task)


def compare_on_image(
    demos: Sequence[SegmentationDemo], image_bgr: np.ndarray, ncols: int | None = None
) -> np.ndarray:
    """One image through several models: the input then each overlay, labelled, in a grid.

    Returns:
        [rows*(H+label), cols*W, 3] uint8 RGB grid (see :func:`labelled_grid`).
    """
    panels, labels = [image_bgr[:, :, ::-1]], ["input"]
    for d in demos:
        outputs, overlay = d.run_on_image(image_bgr)
        panels.append(overlay)
        labels.append(f"{d.label} ({d.drawn_task(outputs)})")
    return labelled_grid(panels, labels, ncols=ncols)


def frames(capture: cv2.VideoCapture, max_frames: int = 0) -> Iterator[np.ndarray]:
    """BGR frames of an opened capture until it ends (or ``max_frames`` > 0 were read)."""
    n = 0
    while capture.isOpened() and (max_frames <= 0 or n < max_frames):
        ok, frame = capture.read()
        if not ok:
            break
        n += 1
        yield frame


def render_frame(
    demos: Sequence[SegmentationDemo], frame_bgr: np.ndarray, ncols: int | None = None
) -> np.ndarray:
    """A BGR output frame: one model's overlay, or the comparison grid for several."""
    if len(demos) == 1:
        rgb = demos[0].run_on_image(frame_bgr)[1]
    else:
        rgb = compare_on_image(demos, frame_bgr, ncols)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def output_path(output: str, input_path: str, suffix: str = "") -> str:
    """Where the overlay of ``input_path`` goes: ``output`` itself when it names an image file,
    else ``<output>/<stem><suffix>.jpg``."""
    ext = os.path.splitext(output)[1].lower()
    if ext in {".jpg", ".jpeg", ".png", ".bmp"}:
        return output
    stem = os.path.splitext(os.path.basename(input_path))[0]
    return os.path.join(output, f"{stem}{suffix}.jpg")


# ---- online video instance segmentation (a model with ``inference_video``, e.g. QueryInstVIS) --


def is_video_model(cfg: CfgNode) -> bool:
    """Whether ``cfg``'s meta-architecture tracks whole videos (has ``inference_video``)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    return hasattr(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), "inference_video")


def track_colour(track_id: int) -> np.ndarray:
    """The colour of a track (RGB in [0, 1]): Detectron2's colormap, one entry per id."""
    from detectron2.utils.colormap import colormap

    table = colormap(rgb=True, maximum=1)
    return table[int(track_id) % len(table)]


class VideoTrackDemo:
    """A video model on a clip: per-frame overlays, each track drawn in its own colour and
    labelled ``#<track id> <class> <score>``."""

    def __init__(self, cfg: CfgNode, confidence_threshold: float = 0.5):
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model

        if not cfg.MODEL.WEIGHTS:
            logger.warning("no MODEL.WEIGHTS given: the video model has random weights")
        self.cfg = cfg
        self.threshold = confidence_threshold
        names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")
        self.model = build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            QSCheckpointer.from_config(cfg, self.model).load(cfg.MODEL.WEIGHTS)
        self.resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )

    def run_on_frames(self, frames_bgr: Sequence[np.ndarray]) -> tuple[list, list[np.ndarray]]:
        """Run the model online over the frames (equal sizes) and draw every frame.

        Returns:
            (per-frame Instances with ``track_ids``, per-frame [H,W,3] uint8 RGB overlays).
        """
        import torch
        from detectron2.utils.visualizer import Visualizer

        if not frames_bgr:
            return [], []
        h, w = frames_bgr[0].shape[:2]
        transform = self.resize.get_transform(frames_bgr[0])
        images = []
        for f in frames_bgr:
            if f.shape[:2] != (h, w):
                raise ValueError(f"clip frames differ in size: {f.shape[:2]} vs {(h, w)}")
            img = f[:, :, ::-1] if self.cfg.INPUT.FORMAT == "RGB" else f
            img = transform.apply_image(np.ascontiguousarray(img))
            images.append(torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))))
        with torch.no_grad():
            per_frame = self.model([{"images": images, "height": h, "width": w}])[0]["frames"]
        classes = self.metadata.get("thing_classes", None)
        overlays = []
        for frame, inst in zip(frames_bgr, per_frame):
            inst = inst.to("cpu")
            inst = inst[inst.scores >= self.threshold]
            labels = [
                f"#{int(t)} {classes[int(c)] if classes else int(c)} {float(s):.0%}"
                for t, c, s in zip(inst.track_ids, inst.pred_classes, inst.scores)
            ]
            vis = Visualizer(frame[:, :, ::-1], self.metadata)
            drawn = vis.overlay_instances(
                masks=inst.pred_masks.numpy(),
                boxes=inst.pred_boxes.tensor.numpy(),
                labels=labels,
                assigned_colors=[track_colour(t) for t in inst.track_ids.tolist()],
            )
            overlays.append(drawn.get_image())
        return per_frame, overlays
