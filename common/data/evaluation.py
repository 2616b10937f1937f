"""Evaluator factory: Detectron2's own evaluators, chosen from the dataset's ``evaluator_type``
metadata and the tasks the model outputs (``cfg.TEST.EVAL_TASKS``).

As Detectron2's and Mask2Former's ``train_net.py`` do, with two differences: the tasks come from
the config instead of being inferred, and ``SemSegEvaluator`` gets a label loader that works under
NumPy 2 (the snapshot's default calls ``np.array(..., copy=False)``, which NumPy 2 rejects).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.utils.file_io import PathManager
from PIL import Image

from .cityscapes import CityscapesInstanceEvaluator
from .shapes import ensure_generated
from .ytvis_evaluation import YTVISEvaluator

logger = logging.getLogger(__name__)

__all__ = ["EVAL_TASKS", "build_evaluator", "load_sem_seg_label"]

#: Every value ``cfg.TEST.EVAL_TASKS`` may hold.
EVAL_TASKS = ("segm", "bbox", "panoptic_seg", "sem_seg")
_INSTANCE_TASKS = ("segm", "bbox")


def load_sem_seg_label(filename: str, dtype: type | np.dtype = int) -> np.ndarray:
    """Read a semantic label PNG as a writable [H,W] array of ``dtype`` (NumPy-2 safe)."""
    with PathManager.open(filename, "rb") as f:
        # np.array copies: SemSegEvaluator writes into the result (ignore -> num_classes).
        return np.array(Image.open(f), dtype=dtype)


def _eval_tasks(cfg: CfgNode) -> tuple[str, ...]:
    tasks = tuple(cfg.TEST.get("EVAL_TASKS", ()))
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad or not tasks:
        raise ValueError(
            f"cfg.TEST.EVAL_TASKS={tasks!r}: expected a non-empty tuple of {EVAL_TASKS}"
            + (f"; unknown: {bad}" if bad else "")
        )
    return tasks


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: str | None = None
) -> DatasetEvaluator:
    """Build the evaluator(s) for ``dataset_name``.

    - evaluator_type "coco": ``COCOEvaluator`` on the "segm"/"bbox" tasks in EVAL_TASKS.
    - "coco_panoptic_seg": ``COCOPanopticEvaluator`` if "panoptic_seg" is a task, plus
      ``COCOEvaluator`` for "segm"/"bbox" (needs metadata ``json_file``) and ``SemSegEvaluator``
      for "sem_seg" (needs semantic labels, metadata ``sem_seg_root``).
    - "sem_seg": ``SemSegEvaluator``.
    - "cityscapes_instance": the official Cityscapes instance evaluation
      (:class:`common.data.cityscapes.CityscapesInstanceEvaluator`, needs ``cityscapesscripts``)
      for "segm", and ``COCOEvaluator`` for "bbox" (the official script scores masks only).
    - "ytvis": ``YTVISEvaluator`` (video AP of mask tubes; needs "segm").

    Args:
        cfg: config with ``TEST.EVAL_TASKS`` (see ``common.engine.defaults.add_common_config``).
        dataset_name: a registered dataset name.
        output_folder: where evaluators write their files; default ``<OUTPUT_DIR>/inference``.

    Returns:
        one evaluator, or a ``DatasetEvaluators`` combining several.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"build_evaluator: dataset {dataset_name!r} is not registered in DatasetCatalog "
            "(built-in 'shapes' names are registered by `import common.data`)"
        )
    ensure_generated(dataset_name)  # the evaluators read the ground truth files
    tasks = _eval_tasks(cfg)
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type")
    instance_tasks = tuple(t for t in tasks if t in _INSTANCE_TASKS)

    if evaluator_type == "coco":
        if not instance_tasks:
            raise ValueError(
                f"dataset {dataset_name!r} (evaluator_type 'coco') is evaluated on 'segm' and/or "
                f"'bbox', but cfg.TEST.EVAL_TASKS={tasks!r} has neither"
            )
        return COCOEvaluator(
            dataset_name, tasks=instance_tasks, distributed=True, output_dir=output_folder
        )

    if evaluator_type == "coco_panoptic_seg":
        evaluators: list[DatasetEvaluator] = []
        if "panoptic_seg" in tasks:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if instance_tasks:
            if meta.get("json_file") is None:
                raise ValueError(
                    f"cfg.TEST.EVAL_TASKS={tasks!r} asks for {instance_tasks} on dataset "
                    f"{dataset_name!r}, whose metadata has no instance 'json_file'"
                )
            evaluators.append(
                COCOEvaluator(
                    dataset_name, tasks=instance_tasks, distributed=True, output_dir=output_folder
                )
            )
        if "sem_seg" in tasks:
            if meta.get("sem_seg_root") is None:
                raise ValueError(
                    f"cfg.TEST.EVAL_TASKS asks for 'sem_seg' on dataset {dataset_name!r}, whose "
                    "metadata has no 'sem_seg_root' (no semantic labels)"
                )
            evaluators.append(_sem_seg_evaluator(dataset_name, output_folder))
        if not evaluators:
            raise ValueError(
                f"cfg.TEST.EVAL_TASKS={tasks!r} selects no evaluator for panoptic dataset "
                f"{dataset_name!r}; use any of {EVAL_TASKS}"
            )
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    if evaluator_type == "sem_seg":
        if "sem_seg" not in tasks:
            logger.warning(
                "dataset %r is a semantic segmentation dataset but cfg.TEST.EVAL_TASKS=%r has no "
                "'sem_seg'; evaluating sem_seg anyway",
                dataset_name,
                tasks,
            )
        return _sem_seg_evaluator(dataset_name, output_folder)

    if evaluator_type == "cityscapes_instance":
        evaluators = []
        if "segm" in tasks:
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))
        if "bbox" in tasks:
            evaluators.append(
                COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True,
                              output_dir=output_folder)
            )  # fmt: skip
        if not evaluators:
            raise ValueError(
                f"dataset {dataset_name!r} (evaluator_type 'cityscapes_instance') is evaluated on "
                f"'segm' and/or 'bbox', but cfg.TEST.EVAL_TASKS={tasks!r} has neither"
            )
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    if evaluator_type == "ytvis":  # video instances: mask-tube AP (masks only, no box AP)
        if "segm" not in tasks:
            raise ValueError(
                f"dataset {dataset_name!r} (evaluator_type 'ytvis') is evaluated on 'segm', but "
                f"cfg.TEST.EVAL_TASKS={tasks!r} has none"
            )
        return YTVISEvaluator(dataset_name, output_dir=output_folder)

    raise ValueError(
        f"no evaluator for dataset {dataset_name!r}: its metadata evaluator_type is "
        f"{evaluator_type!r}; supported: 'coco', 'coco_panoptic_seg', 'sem_seg', "
        "'cityscapes_instance', 'ytvis'"
    )


def _sem_seg_evaluator(dataset_name: str, output_folder: str) -> SemSegEvaluator:
    return SemSegEvaluator(
        dataset_name,
        distributed=True,
        output_dir=output_folder,
        sem_seg_loading_fn=load_sem_seg_label,
    )
