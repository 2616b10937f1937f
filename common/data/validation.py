"""Input checks that turn bad data into errors naming the file, key or value.

- :func:`check_dataset_files`: every file/folder a registered dataset's metadata names exists,
  else a one-line error with how to prepare COCO / ADE20K (before any model is built).
- :func:`load_train_dicts`: the training set's dicts, loaded once (the Trainer hands them to its
  loader), with Detectron2's loading errors tied to the JSON file, the polygons it drops listed by
  annotation id, and every annotation checked by :func:`validate_annotations`.
- :func:`read_image_checked` / :func:`validate_annotations`: the mappers' per-image checks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

from .cityscapes import needs_cityscapesscripts, require_cityscapesscripts

logger = logging.getLogger(__name__)

# metadata fields that name a file or folder a dataset reads
_PATH_FIELDS = (
    "json_file", "image_root", "panoptic_json", "panoptic_root", "sem_seg_root",
    "image_dir", "gt_dir",  # Detectron2's Cityscapes registrations
)  # fmt: skip

_PREPARE_HINTS = {
    "coco": (
        "prepare COCO under $DETECTRON2_DATASETS/coco/: train2017/ and val2017/ images and "
        "annotations/instances_*2017.json from cocodataset.org; for panoptic also "
        "panoptic_annotations_trainval2017 (annotations/panoptic_*2017.json + panoptic_*2017/) "
        "then detectron2's datasets/prepare_panoptic_fpn.py"
    ),
    "ade20k": (
        "prepare ADE20K under $DETECTRON2_DATASETS/ADEChallengeData2016/: unzip "
        "ADEChallengeData2016.zip (sceneparsing.csail.mit.edu), then run detectron2's "
        "datasets/prepare_ade20k_sem_seg.py (writes annotations_detectron2/)"
    ),
    "cityscapes": (
        "prepare Cityscapes under $DETECTRON2_DATASETS/cityscapes/: unzip "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (cityscapes-dataset.com) there, "
        "giving leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/"
        "*_gtFine_{polygons.json,instanceIds.png,labelIds.png}"
    ),
}


class DataError(ValueError):
    """A dataset file or annotation is unusable; the message names the file and the field."""


def read_image_checked(file_name: str, fmt: str) -> np.ndarray:
    """Read an image like ``detection_utils.read_image``, with an error naming the file.

    Returns:
        [H,W,C] uint8 array (C = 1 for "L").
    """
    if not os.path.exists(file_name):
        raise DataError(f"image file not found: {file_name}")
    try:
        return utils.read_image(file_name, format=fmt)
    except Exception as e:  # PIL raises several types for corrupt files
        raise DataError(f"cannot read image {file_name}: {type(e).__name__}: {e}") from e


def _box_size(bbox: list[float], mode: Any) -> float:
    """min(width, height) of a box in XYWH (COCO) or XYXY form."""
    from detectron2.structures import BoxMode

    x0, y0, a, b = (float(v) for v in bbox)
    if mode in (BoxMode.XYXY_ABS, BoxMode.XYXY_REL, int(BoxMode.XYXY_ABS), int(BoxMode.XYXY_REL)):
        return min(a - x0, b - y0)
    return min(a, b)


def annotation_problem(anno: dict[str, Any], need_masks: bool = False) -> str | None:
    """What is wrong with one COCO instance annotation (``" has ..."`` / ``": ..."``), or None.

    Checks: ``category_id`` present; ``bbox`` has 4 finite numbers and no negative width/height;
    polygon segmentations are non-empty lists of polygons with an even number (>= 6) of finite
    coordinates; RLE dicts have ``size`` and ``counts``; with ``need_masks``, a ``segmentation``
    is present (Detectron2's ``load_coco_json`` removes an empty one, ``"segmentation": []``).
    """
    if "category_id" not in anno:
        return " has no 'category_id'"
    bbox = anno.get("bbox")
    if bbox is None or len(bbox) != 4 or not np.all(np.isfinite(np.asarray(bbox, float))):
        return f" has an invalid 'bbox': {bbox!r}"
    if _box_size(bbox, anno.get("bbox_mode")) < 0:
        return f" has a 'bbox' with a negative width or height: {bbox!r}"
    seg = anno.get("segmentation")
    if seg is None:
        if need_masks:
            return (
                " has no 'segmentation' (missing, or empty in the JSON); the model trains on "
                "masks: give it a polygon/RLE or remove the annotation"
            )
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return ": RLE 'segmentation' needs 'counts' and 'size'"
        return None
    if not isinstance(seg, list) or len(seg) == 0:
        return f" has an empty or invalid 'segmentation': {seg!r}"
    for poly in seg:
        arr = np.asarray(poly, dtype=float)
        if arr.ndim != 1 or len(arr) < 6 or len(arr) % 2 or not np.all(np.isfinite(arr)):
            return (
                ": polygon must hold an even number (>= 6) of finite coordinates, "
                f"got {len(arr)} values"
            )
    return None


def validate_annotations(
    annos: list[dict[str, Any]], file_name: str, need_masks: bool = False
) -> None:
    """Raise :class:`DataError` naming the image and the annotation for the first malformed
    annotation (:func:`annotation_problem`)."""
    for i, anno in enumerate(annos):
        problem = annotation_problem(anno, need_masks)
        if problem:
            raise DataError(f"{file_name}: annotation #{i} (id={anno.get('id', '?')}){problem}")


def _annotation_ids(json_file: str, image_id: Any, bbox: list[float]) -> list[Any]:
    """Ids of the annotations of ``image_id`` with this ``bbox`` in the JSON (Detectron2's dicts
    do not keep the annotation id)."""
    with open(json_file) as f:
        data = json.load(f)
    return [
        a.get("id")
        for a in data.get("annotations", [])
        if a.get("image_id") == image_id and list(a.get("bbox", [])) == list(bbox)
    ]


def _validate_records(name: str, dicts: list[dict], need_masks: bool) -> None:
    meta = MetadataCatalog.get(name)
    json_file = getattr(meta, "json_file", None) if hasattr(meta, "json_file") else None
    for d in dicts:
        annos = d.get("annotations", [])
        if "file_names" in d:  # a video (common.data.ytvis): one list of annotations per frame
            annos = [a for frame in annos for a in frame]
        annos = [a for a in annos if a.get("iscrowd", 0) == 0]
        for anno in annos:
            problem = annotation_problem(anno, need_masks)
            if not problem:
                continue
            ids = anno.get("id")
            if ids is None and json_file and "bbox" in anno:
                found = _annotation_ids(json_file, d.get("image_id"), anno["bbox"])
                ids = found[0] if len(found) == 1 else "/".join(map(str, found)) or "?"
            src = f"{json_file}: " if json_file else f"dataset {name}: "
            if "file_names" in d:
                raise DataError(
                    f"{src}annotation id={ids} of video id={d.get('video_id')}{problem}"
                )
            raise DataError(
                f"{src}annotation id={ids} of image {d['file_name']} "
                f"(image id={d.get('image_id', '?')}){problem}"
            )


def datasets_root() -> str:
    """The datasets folder, absolute: ``$DETECTRON2_DATASETS``, or ``./datasets`` (Detectron2's
    convention). Every generated or registered dataset and the benchmark's cached backbone live
    under it."""
    return os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def check_dataset_files(names: list[str] | tuple[str, ...]) -> None:
    """Raise ``FileNotFoundError`` naming the first missing file/folder of any dataset in
    ``names`` (as its metadata records them), with a hint on how to prepare COCO / ADE20K.

    Datasets registered without paths in their metadata are not checked. A Cityscapes dataset
    also needs ``cityscapesscripts`` (an ``ImportError`` names the extra to install)."""
    for name in names:
        if name not in DatasetCatalog.list():
            continue  # Detectron2's own "not registered" error lists the known names
        meta = MetadataCatalog.get(name)
        if needs_cityscapesscripts(getattr(meta, "evaluator_type", None)):
            require_cityscapesscripts(f"dataset {name}")
        for field in _PATH_FIELDS:
            path = getattr(meta, field, None) if hasattr(meta, field) else None
            if path and not os.path.exists(path):
                kind = next((k for k in _PREPARE_HINTS if k in name), None)
                hint = _PREPARE_HINTS.get(
                    kind, "register the dataset with existing paths or fix the paths"
                )
                raise FileNotFoundError(
                    f"dataset {name}: {field} {path} does not exist (DETECTRON2_DATASETS="
                    f"{datasets_root()}); {hint}"
                )


class _CaptureDroppedPolygons(logging.Handler):
    """Notices Detectron2's ``load_coco_json`` warning that it dropped annotations."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.dropped = False

    def emit(self, record: logging.LogRecord) -> None:
        if "without valid segmentation" in record.getMessage():
            self.dropped = True


@contextlib.contextmanager
def _capture_coco_warnings() -> Iterator[_CaptureDroppedPolygons]:
    handler = _CaptureDroppedPolygons()
    coco_logger = logging.getLogger("detectron2.data.datasets.coco")
    coco_logger.addHandler(handler)
    try:
        yield handler
    finally:
        coco_logger.removeHandler(handler)


def _bad_polygon_annotations(json_file: str) -> list[str]:
    """``image file: annotation id`` of every annotation whose polygons Detectron2 drops (none
    with an even number >= 6 of coordinates), read back from the JSON."""
    with open(json_file) as f:
        data = json.load(f)
    files = {img["id"]: img.get("file_name", img["id"]) for img in data.get("images", [])}
    out = []
    for anno in data.get("annotations", []):
        seg = anno.get("segmentation")
        if isinstance(seg, list) and seg:
            if not any(len(p) % 2 == 0 and len(p) >= 6 for p in seg):
                out.append(
                    f"{files.get(anno.get('image_id'), '?')}: annotation id={anno.get('id')}"
                )
    return out


def load_dataset_dicts_checked(name: str) -> list[dict]:
    """``DatasetCatalog.get(name)`` with errors and warnings that name the JSON file."""
    meta = MetadataCatalog.get(name)
    json_file = getattr(meta, "json_file", None) if hasattr(meta, "json_file") else None
    where = f"dataset {name}" + (f" ({json_file})" if json_file else "")
    with _capture_coco_warnings() as captured:
        try:
            dicts = DatasetCatalog.get(name)
        except KeyError as e:
            msg = e.args[0] if e.args else e
            raise DataError(f"{where}: {msg}") from e
    if captured.dropped and json_file:
        bad = _bad_polygon_annotations(json_file)
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            logger.warning(
                f"{where}: dropped {len(bad)} annotation(s) without a polygon of >= 3 points: "
                f"{'; '.join(bad[:5])}{more}"
            )
    return dicts


def load_train_dicts(cfg: CfgNode, need_masks: bool) -> list[dict]:
    """The training dicts of ``cfg.DATASETS.TRAIN``, as Detectron2's
    ``get_detection_dataset_dicts`` prepares them, checked up front: missing files
    (:func:`check_dataset_files`), loading errors naming the JSON
    (:func:`load_dataset_dicts_checked`) and every annotation (:func:`validate_annotations`;
    ``need_masks``: the mapper builds masks, so a missing or empty ``segmentation`` is an error).
    """
    from detectron2.data.build import (
        filter_images_with_few_keypoints,
        filter_images_with_only_crowd_annotations,
        load_proposals_into_dataset,
        print_instances_class_histogram,
    )

    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: nothing to train on")
    check_dataset_files(names)
    per_name = []
    for name in names:
        dicts = load_dataset_dicts_checked(name)
        if not isinstance(dicts, list):
            raise DataError(f"dataset {name}: expected a list of dicts, got {type(dicts).__name__}")
        if not dicts:
            raise DataError(f"dataset {name} is empty")
        per_name.append(dicts)
    if cfg.MODEL.LOAD_PROPOSALS:
        files = cfg.DATASETS.PROPOSAL_FILES_TRAIN
        per_name = [load_proposals_into_dataset(d, f) for d, f in zip(per_name, files)]
    for name, ds in zip(names, per_name):
        _validate_records(name, ds, need_masks)
    dicts = [d for ds in per_name for d in ds]
    if "annotations" in dicts[0] and "file_names" not in dicts[0]:  # images, not videos
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            dicts = filter_images_with_only_crowd_annotations(dicts)
        if cfg.MODEL.KEYPOINT_ON and cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE > 0:
            dicts = filter_images_with_few_keypoints(
                dicts, cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            )
        classes = getattr(MetadataCatalog.get(names[0]), "thing_classes", None)
        if classes:
            print_instances_class_histogram(dicts, classes)
    if not dicts:
        raise DataError(f"no image with annotations left in {', '.join(names)}")
    return dicts
