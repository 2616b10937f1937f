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
    from common.engine import get_cfg, merge_config, setup_queryseg

    setup_queryseg()
    cfg = get_cfg()
    merge_config(cfg, config_file, list(opts))
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
