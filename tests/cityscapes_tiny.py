"""A tiny Cityscapes-layout dataset for the tests, written from polygons the way Cityscapes is.

``write_tiny_cityscapes(root)`` writes ``root/cityscapes/`` as the official archives unpack:
``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and, next to it in
``gtFine/<split>/<city>/``, ``*_gtFine_polygons.json`` (the annotation) plus
``*_gtFine_instanceIds.png`` and ``*_gtFine_labelIds.png`` rendered from it by cityscapesscripts'
own ``preparation/json2instanceImg.py`` / ``json2labelImg.py`` (as the official ground truth is;
the instance image is saved as a 16-bit PNG like the official files, since Pillow >= 11 no longer
writes the script's 32-bit mode "I" PNGs).
Two cities per split; 128x64 images with road and sky stuff, and three thing objects each (axis-
aligned, non-overlapping, 300-1000 px: above the evaluation's 100 px minimum region), cycling
through the 8 thing classes; the first training image also holds a crowd region ("cargroup") and a
deleted polygon. Each class is painted in its own colour, so the images are learnable.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
from PIL import Image

#: Detectron2's Cityscapes thing classes, in its contiguous order.
THING_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
#: split -> city -> number of images
LAYOUT = {"train": {"aachen": 2, "bochum": 2}, "val": {"frankfurt": 1, "lindau": 1}}
WIDTH, HEIGHT = 128, 64
_COLOURS = {
    "road": (128, 64, 128), "sky": (70, 130, 180), "person": (220, 20, 60), "rider": (255, 0, 0),
    "car": (0, 0, 142), "truck": (0, 0, 70), "bus": (0, 60, 100), "train": (0, 80, 100),
    "motorcycle": (0, 0, 230), "bicycle": (119, 11, 32), "cargroup": (0, 0, 142),
}  # fmt: skip


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _objects(rng: random.Random, first_class: int, extra: bool) -> list[dict]:
    """Stuff first, then three things in three horizontal slots (later objects overwrite)."""
    objs = [
        {"label": "sky", "polygon": _rect(0, 0, WIDTH - 1, HEIGHT // 3)},
        {"label": "road", "polygon": _rect(0, HEIGHT // 3 + 1, WIDTH - 1, HEIGHT - 1)},
    ]
    slot = WIDTH // 3
    for i in range(3):
        w, h = rng.randint(18, 30), rng.randint(16, 30)
        x0 = i * slot + rng.randint(1, slot - w - 1)
        y0 = rng.randint(4, HEIGHT - h - 4)
        label = THING_CLASSES[(first_class + i) % len(THING_CLASSES)]
        objs.append({"label": label, "polygon": _rect(x0, y0, x0 + w - 1, y0 + h - 1)})
    if extra:
        objs.append({"label": "cargroup", "polygon": _rect(2, HEIGHT - 8, 40, HEIGHT - 2)})
        objs.append({"label": "car", "polygon": _rect(90, 2, 120, 20), "deleted": 1})
    return objs


def write_tiny_cityscapes(root: str, seed: int = 0) -> dict[str, list[str]]:
    """Write the dataset under ``root/cityscapes``; returns split -> image files written."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    rng = random.Random(seed)
    written: dict[str, list[str]] = {}
    k = 0
    for split, cities in LAYOUT.items():
        written[split] = []
        for city, count in cities.items():
            img_dir = os.path.join(root, "cityscapes", "leftImg8bit", split, city)
            gt_dir = os.path.join(root, "cityscapes", "gtFine", split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(gt_dir, exist_ok=True)
            for j in range(count):
                stem = f"{city}_{j:06d}_000019"
                objs = _objects(rng, first_class=3 * k, extra=(k == 0))
                k += 1
                ann = {"imgHeight": HEIGHT, "imgWidth": WIDTH, "objects": objs}
                poly_file = os.path.join(gt_dir, f"{stem}_gtFine_polygons.json")
                with open(poly_file, "w") as f:
                    json.dump(ann, f)
                annotation = Annotation()
                annotation.fromJsonFile(poly_file)
                ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.uint16)
                Image.fromarray(ids).save(os.path.join(gt_dir, f"{stem}_gtFine_instanceIds.png"))
                json2labelImg(poly_file, os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"))
                image = np.full((HEIGHT, WIDTH, 3), 90, dtype=np.uint8)
                for obj in objs:
                    if obj.get("deleted"):
                        continue
                    (x0, y0), (x1, y1) = obj["polygon"][0], obj["polygon"][2]
                    image[y0 : y1 + 1, x0 : x1 + 1] = _COLOURS[obj["label"]]
                noise = np.random.default_rng(seed + k).integers(-12, 13, image.shape)
                image = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
                img_file = os.path.join(img_dir, f"{stem}_leftImg8bit.png")
                Image.fromarray(image).save(img_file)
                written[split].append(img_file)
    return written
