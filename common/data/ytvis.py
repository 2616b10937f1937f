"""YouTube-VIS 2019-format video instance segmentation datasets, registered in Detectron2's style.

The JSON (YouTube-VIS 2019, ``train.json`` / ``valid.json``)::

    videos:      [{id, width, height, length, file_names: ["<video>/<frame>.jpg", ...]}]
    annotations: [{id, video_id, category_id, iscrowd, segmentations: [RLE | null] * length,
                   bboxes: [[x, y, w, h] | null] * length, areas: [float | null] * length}]
    categories:  [{id, name, supercategory}]

``null`` marks a frame in which the instance is absent; RLE is compressed (``counts`` a string)
or uncompressed (``counts`` a list, as the released files hold).

:func:`load_ytvis_json` turns it into one dict per video, as Mask2Former's video loader does:
``file_names`` (absolute frame paths), ``height``, ``width``, ``length``, ``video_id`` and
``annotations``, a list (one entry per frame) of lists of instance dicts with ``id`` (the track
id), ``category_id`` (contiguous), ``iscrowd``, ``bbox`` (XYWH_ABS) and ``segmentation`` (RLE).
:func:`register_ytvis_instances` registers such a dataset with ``evaluator_type="ytvis"``;
the builtin ``ytvis_2019_{train,val}`` live under ``$DETECTRON2_DATASETS/ytvis_2019/``.
"""

from __future__ import annotations

import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .validation import datasets_root

logger = logging.getLogger(__name__)

__all__ = [
    "YTVIS_2019_CATEGORIES",
    "load_ytvis_json",
    "register_all_ytvis_2019",
    "register_ytvis_instances",
]

#: The 40 YouTube-VIS 2019 categories (ids 1..40, as in the released ``train.json``).
YTVIS_2019_CATEGORIES: list[dict] = [
    {"id": i + 1, "name": name}
    for i, name in enumerate(
        "person giant_panda lizard parrot skateboard sedan ape dog snake monkey hand rabbit duck "
        "cat cow fish train horse turtle bear motorbike giraffe leopard fox deer owl surfboard "
        "airplane truck zebra tiger elephant snowboard boat shark mouse frog eagle earless_seal "
        "tennis_racket".split()
    )
]


class YTVISFormatError(ValueError):
    """A YouTube-VIS JSON that cannot be used; the message names the file and the entry."""


def ytvis_metadata(categories: list[dict]) -> dict:
    """thing_classes / thing_dataset_id_to_contiguous_id (and colours when given) of a category
    list ``[{id, name[, color]}]``, ordered by id."""
    cats = sorted(categories, key=lambda c: c["id"])
    meta = {
        "thing_classes": [c["name"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }
    if all("color" in c for c in cats):
        meta["thing_colors"] = [c["color"] for c in cats]
    return meta


def load_ytvis_json(json_file: str, image_root: str, dataset_name: str | None = None) -> list[dict]:
    """Load a YouTube-VIS 2019-format JSON into one dict per video (see the module docstring).

    Args:
        json_file: path of the JSON.
        image_root: folder the ``file_names`` of the videos are relative to (``JPEGImages``).
        dataset_name: when given, its metadata gets ``thing_classes`` and the id mapping from the
            JSON's categories if it has none, and is checked against them otherwise.

    Returns:
        list of video dicts; videos without annotations get an empty list per frame.
    """
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise YTVISFormatError(f"{json_file}: not valid JSON ({e})") from e
    for key in ("videos", "categories"):
        if key not in data:
            raise YTVISFormatError(f"{json_file}: no {key!r} list (is it a YouTube-VIS JSON?)")
    id_map = ytvis_metadata(data["categories"])["thing_dataset_id_to_contiguous_id"]
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
        if not hasattr(meta, "thing_classes"):
            meta.set(**ytvis_metadata(data["categories"]))
        elif list(meta.thing_classes) != names:
            raise YTVISFormatError(
                f"{json_file}: categories {names} differ from the registered thing_classes "
                f"{list(meta.thing_classes)} of dataset {dataset_name}"
            )
        id_map = meta.thing_dataset_id_to_contiguous_id
    by_video: dict[int, list[dict]] = {}
    for anno in data.get("annotations", []):
        by_video.setdefault(anno["video_id"], []).append(anno)
    dicts = []
    for video in data["videos"]:
        n = int(video["length"])
        if len(video["file_names"]) != n:
            raise YTVISFormatError(
                f"{json_file}: video id={video['id']} has length {n} but "
                f"{len(video['file_names'])} file_names"
            )
        frames: list[list[dict]] = [[] for _ in range(n)]
        for anno in by_video.get(video["id"], []):
            segs = anno.get("segmentations")
            if segs is None or len(segs) != n:
                raise YTVISFormatError(
                    f"{json_file}: annotation id={anno.get('id')} of video id={video['id']} has "
                    f"{'no' if segs is None else len(segs)} segmentations for {n} frames"
                )
            if anno["category_id"] not in id_map:
                raise YTVISFormatError(
                    f"{json_file}: annotation id={anno['id']} has category_id "
                    f"{anno['category_id']}, not among the categories {sorted(id_map)}"
                )
            bboxes = anno.get("bboxes") or [None] * n
            for t, seg in enumerate(segs):
                if seg is None:
                    continue
                if bboxes[t] is None:
                    raise YTVISFormatError(
                        f"{json_file}: annotation id={anno['id']} has a segmentation but no bbox "
                        f"in frame {t}"
                    )
                frames[t].append(
                    {
                        "id": anno["id"],
                        "category_id": id_map[anno["category_id"]],
                        "iscrowd": anno.get("iscrowd", 0),
                        "bbox": bboxes[t],
                        "bbox_mode": BoxMode.XYWH_ABS,
                        "segmentation": seg,
                    }
                )
        dicts.append(
            {
                "file_names": [os.path.join(image_root, p) for p in video["file_names"]],
                "height": video["height"],
                "width": video["width"],
                "length": n,
                "video_id": video["id"],
                "annotations": frames,
            }
        )
    logger.info(f"Loaded {len(dicts)} videos in YouTube-VIS format from {json_file}")
    return dicts


def register_ytvis_instances(name: str, metadata: dict, json_file: str, image_root: str) -> None:
    """Register a YouTube-VIS 2019-format dataset ``name`` (as ``register_coco_instances``).

    Args:
        metadata: extra metadata (e.g. ``thing_classes``); class names come from the JSON if
            absent.
        json_file, image_root: the annotation JSON and the folder of ``<video>/<frame>.jpg``.
    """
    DatasetCatalog.register(name, lambda: load_ytvis_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="ytvis", **metadata
    )


#: builtin name -> (image_root, json_file), relative to $DETECTRON2_DATASETS
_PREDEFINED_YTVIS_2019 = {
    "ytvis_2019_train": ("ytvis_2019/train/JPEGImages", "ytvis_2019/train.json"),
    "ytvis_2019_val": ("ytvis_2019/valid/JPEGImages", "ytvis_2019/valid.json"),
}


def register_all_ytvis_2019(root: str) -> None:
    """Register ``ytvis_2019_train`` / ``ytvis_2019_val`` under ``root`` (nothing is read)."""
    for name, (image_root, json_file) in _PREDEFINED_YTVIS_2019.items():
        if name in DatasetCatalog.list():
            continue
        register_ytvis_instances(
            name,
            ytvis_metadata(YTVIS_2019_CATEGORIES),
            os.path.join(root, json_file),
            os.path.join(root, image_root),
        )


if __name__.endswith(".ytvis"):  # as detectron2's builtin.py: registered on import
    register_all_ytvis_2019(datasets_root())
