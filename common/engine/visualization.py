"""Drawing predictions and ground truth with Detectron2's Visualizer, for every QuerySeg method.

- :func:`draw_predictions` overlays a model's output (``instances``, ``panoptic_seg`` or
  ``sem_seg``) on an image, with an optional confidence threshold; ``demo/demo.py`` uses it.
- :func:`draw_ground_truth` overlays a Detectron2 dataset dict's annotations.
- :func:`labelled_grid` lays panels out in a grid, each under a text label.
- :class:`VisualizationHook` puts "ground truth | prediction" images of a few fixed images into
  Detectron2's :class:`EventStorage` every ``period`` iterations, so that TensorBoard shows how
  the predictions of any meta-architecture evolve during training.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.engine import HookBase
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

logger = logging.getLogger(__name__)

#: Output keys a meta-architecture may return, in the order "auto" picks them.
TASK_KEYS = {"panoptic": "panoptic_seg", "instance": "instances", "semantic": "sem_seg"}


def choose_task(outputs: dict[str, Any], task: str = "auto") -> str:
    """Which of a model's outputs to draw.

    Args:
        outputs: one image's output dict (``instances`` / ``panoptic_seg`` / ``sem_seg``).
        task: "auto" (panoptic, else instance, else semantic, as Detectron2's demo does),
            "instance", "panoptic" or "semantic".
    Returns:
        "instance" | "panoptic" | "semantic".
    """
    if task == "auto":
        for name, key in TASK_KEYS.items():
            if key in outputs:
                return name
        raise KeyError(f"model output has none of {sorted(TASK_KEYS.values())}: {list(outputs)}")
    if task not in TASK_KEYS:
        raise ValueError(f"task={task!r}: expected 'auto' or one of {sorted(TASK_KEYS)}")
    if TASK_KEYS[task] not in outputs:
        raise KeyError(
            f"task={task!r} needs {TASK_KEYS[task]!r} but the model returned only {list(outputs)}"
        )
    return task


def filter_instances(instances: Instances, score_threshold: float) -> Instances:
    """Keep the instances whose ``scores`` reach ``score_threshold`` (all when it is <= 0)."""
    if score_threshold <= 0 or not instances.has("scores"):
        return instances
    return instances[instances.scores >= score_threshold]


def _filter_panoptic(
    panoptic_seg: torch.Tensor, segments_info: list[dict] | None, score_threshold: float
) -> tuple[torch.Tensor, list[dict] | None]:
    """Drop thing segments whose ``score`` is below the threshold (their pixels become void 0).

    Args:
        panoptic_seg: [H,W] int segment ids.
    """
    if segments_info is None or score_threshold <= 0:
        return panoptic_seg, segments_info
    keep, seg = [], panoptic_seg.clone()
    for s in segments_info:
        if s.get("isthing", True) and s.get("score", 1.0) < score_threshold:
            seg[seg == s["id"]] = 0
        else:
            keep.append(s)
    return seg, keep


def draw_predictions(
    image_rgb: np.ndarray,
    outputs: dict[str, Any],
    metadata: Any,
    *,
    task: str = "auto",
    score_threshold: float = 0.0,
    instance_mode: ColorMode = ColorMode.IMAGE,
    scale: float = 1.0,
) -> np.ndarray:
    """Overlay one image's predictions with Detectron2's Visualizer.

    Args:
        image_rgb: [H,W,3] uint8 RGB image, at the size the outputs were produced for (the
            ``height``/``width`` the model was given).
        outputs: the model's output for this image: ``instances`` (Instances with pred_masks
            [N,H,W], pred_boxes, pred_classes, scores), ``panoptic_seg`` ((seg [H,W],
            segments_info)) and/or ``sem_seg`` ([K,H,W] scores).
        metadata: the dataset's Metadata (class names and colours).
        task: see :func:`choose_task`.
        score_threshold: instances (and scored panoptic things) below it are not drawn.
        scale: the overlay is drawn at ``scale`` x the image size (labels stay legible on small
            images).
    Returns:
        [H*scale,W*scale,3] uint8 RGB overlay.
    """
    task = choose_task(outputs, task)
    vis = Visualizer(image_rgb, metadata, instance_mode=instance_mode, scale=scale)
    if task == "panoptic":
        seg, info = outputs["panoptic_seg"]
        seg, info = _filter_panoptic(seg.to("cpu"), info, score_threshold)
        out = vis.draw_panoptic_seg(seg, info)
    elif task == "instance":
        inst = filter_instances(outputs["instances"].to("cpu"), score_threshold)
        out = vis.draw_instance_predictions(inst)
    else:
        sem_seg = outputs["sem_seg"]
        if sem_seg.dim() == 3:  # [K,H,W] scores -> [H,W] labels
            sem_seg = sem_seg.argmax(dim=0)
        out = vis.draw_sem_seg(sem_seg.to("cpu"))
    return out.get_image()


def draw_ground_truth(
    image_rgb: np.ndarray, dataset_dict: dict, metadata: Any, scale: float = 1.0
) -> np.ndarray:
    """Overlay a Detectron2 dataset dict's annotations (instances, sem_seg or panoptic).

    Args:
        image_rgb: [H,W,3] uint8 RGB image at the dataset dict's original size.
        scale: as in :func:`draw_predictions`.
    Returns:
        [H*scale,W*scale,3] uint8 RGB overlay.
    """
    vis = Visualizer(image_rgb, metadata, scale=scale)
    return vis.draw_dataset_dict(dataset_dict).get_image()


def _caption(panel: np.ndarray, label: str, height: int) -> np.ndarray:
    """Put ``label`` in a white strip of ``height`` pixels above ``panel`` ([H,W,3] uint8)."""
    strip = np.full((height, panel.shape[1], 3), 255, np.uint8)
    scale = height / 40.0
    (tw, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if tw > panel.shape[1] - 4:  # shrink long labels to fit the panel
        scale *= (panel.shape[1] - 4) / tw
    cv2.putText(
        strip,
        label,
        (2, int(height * 0.72)),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return np.concatenate([strip, panel], axis=0)


def labelled_grid(
    panels: Sequence[np.ndarray],
    labels: Sequence[str],
    ncols: int | None = None,
    label_height: int = 24,
    pad: int = 4,
) -> np.ndarray:
    """Lay panels out in a grid, each under its label.

    Args:
        panels: [H_i,W_i,3] uint8 RGB images; each is resized to the first panel's size.
        labels: one text per panel.
        ncols: panels per row (default: all in one row).
    Returns:
        [rows*(H+label_height+pad)-pad, ncols*(W+pad)-pad, 3] uint8 RGB grid on white.
    """
    if len(panels) != len(labels):
        raise ValueError(f"{len(panels)} panels but {len(labels)} labels")
    if not panels:
        raise ValueError("labelled_grid needs at least one panel")
    h, w = panels[0].shape[:2]
    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    cell_h, cell_w = h + label_height + pad, w + pad
    grid = np.full((nrows * cell_h - pad, ncols * cell_w - pad, 3), 255, np.uint8)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        if panel.shape[:2] != (h, w):
            panel = cv2.resize(panel, (w, h), interpolation=cv2.INTER_AREA)
        r, c = divmod(i, ncols)
        grid[r * cell_h : r * cell_h + h + label_height, c * cell_w : c * cell_w + w] = _caption(
            panel, label, label_height
        )
    return grid


class VisualizationHook(HookBase):
    """Every ``period`` iterations, run the model in eval mode on a few fixed images of a dataset
    and put "ground truth | prediction" panels into the EventStorage (``vis/gt_vs_pred_<i>``),
    which Detectron2's TensorboardXWriter writes to TensorBoard.

    Works for every meta-architecture: it only needs Detectron2's inference output format. Runs on
    the main process only; the model's training mode is restored afterwards.
    """

    def __init__(
        self,
        cfg: CfgNode,
        period: int,
        *,
        num_images: int = 2,
        dataset_name: str | None = None,
        score_threshold: float = 0.3,
    ):
        """
        Args:
            cfg: the training config (input format, test mapper, dataset names).
            period: visualise after every ``period`` iterations and after the last one.
            num_images: how many images (the first ones of the dataset) to show.
            dataset_name: default ``cfg.DATASETS.TEST[0]`` (else ``TRAIN[0]``).
            score_threshold: instances below this score are not drawn.
        """
        if period <= 0:
            raise ValueError(f"VisualizationHook period must be > 0, got {period}")
        self._cfg = cfg.clone()
        self._period = period
        self._num_images = num_images
        self._threshold = score_threshold
        names = (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN)
        self._dataset_name = dataset_name or (names[0] if names else None)
        if self._dataset_name is None:
            raise ValueError("VisualizationHook: no dataset_name and none in cfg.DATASETS")
        self._samples: list[tuple[dict, dict, np.ndarray]] | None = None

    def _load_samples(self) -> list[tuple[dict, dict, np.ndarray]]:
        """(dataset dict, mapped model input, RGB image) for the first ``num_images`` images."""
        from common.data.mappers import build_mapper

        mapper = build_mapper(self._cfg, is_train=False)
        samples = []
        for d in DatasetCatalog.get(self._dataset_name)[: self._num_images]:
            image = utils.read_image(d["file_name"], format="RGB")
            inputs = mapper(copy.deepcopy(d))
            inputs.pop("instances", None)
            inputs.pop("sem_seg", None)
            inputs["height"], inputs["width"] = image.shape[:2]
            samples.append((d, inputs, image))
        return samples

    def visualize(self) -> list[np.ndarray]:
        """Run the model on the fixed images and put the panels into the current EventStorage.

        Returns:
            one [H, 2W+pad, 3] uint8 RGB panel ("ground truth | prediction") per image.
        """
        if self._samples is None:
            self._samples = self._load_samples()
        model = self.trainer.model
        model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        metadata = MetadataCatalog.get(self._dataset_name)
        was_training = model.training
        model.eval()
        panels = []
        try:
            with torch.no_grad():
                for i, (d, inputs, image) in enumerate(self._samples):
                    outputs = model([inputs])[0]
                    gt = draw_ground_truth(image, d, metadata)
                    pred = draw_predictions(
                        image, outputs, metadata, score_threshold=self._threshold
                    )
                    panel = labelled_grid([gt, pred], ["ground truth", "prediction"])
                    self.trainer.storage.put_image(f"vis/gt_vs_pred_{i}", panel.transpose(2, 0, 1))
                    panels.append(panel)
        finally:
            model.train(was_training)
        return panels

    def after_step(self) -> None:
        it = self.trainer.iter + 1
        if it % self._period == 0 or it == self.trainer.max_iter:
            self.visualize()
