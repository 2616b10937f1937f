"""Input checks that turn bad data into errors naming the file, key or value."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from detectron2.data import detection_utils as utils


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


def validate_annotations(annos: list[dict[str, Any]], file_name: str) -> None:
    """Reject malformed COCO instance annotations with a message naming the image and annotation.

    Checks: ``bbox`` has 4 finite numbers; polygon segmentations are non-empty lists of polygons
    with
    an even number (>= 6) of finite coordinates; RLE dicts have ``size`` and ``counts``.
    """
    for i, anno in enumerate(annos):
        where = f"{file_name}: annotation #{i} (id={anno.get('id', '?')})"
        if "category_id" not in anno:
            raise DataError(f"{where} has no 'category_id'")
        bbox = anno.get("bbox")
        if bbox is None or len(bbox) != 4 or not np.all(np.isfinite(np.asarray(bbox, float))):
            raise DataError(f"{where} has an invalid 'bbox': {bbox!r}")
        seg = anno.get("segmentation")
        if seg is None:
            continue
        if isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                raise DataError(f"{where}: RLE 'segmentation' needs 'counts' and 'size'")
            continue
        if not isinstance(seg, list) or len(seg) == 0:
            raise DataError(f"{where} has an empty or invalid 'segmentation': {seg!r}")
        for poly in seg:
            arr = np.asarray(poly, dtype=float)
            if arr.ndim != 1 or len(arr) < 6 or len(arr) % 2 or not np.all(np.isfinite(arr)):
                raise DataError(
                    f"{where}: polygon must hold an even number (>= 6) of finite coordinates, "
                    f"got {len(arr)} values"
                )
