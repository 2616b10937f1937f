"""``shapes_vis``: the built-in synthetic video instance segmentation dataset (YouTube-VIS 2019
JSON), made of ``shapes`` objects that move, occlude each other, appear and leave.

A clip is one ``shapes`` scene set in motion: a static stuff background and 1..``max_things``
thing shapes drawn exactly as ``shapes_gen`` draws them under the preset (same classes, radii,
colours and rasteriser; the drawing code is ``shapes_gen``'s, not a copy), each with its own
constant velocity, a fixed depth (later shapes cover earlier ones), and a time span: most shapes
are there from the first frame to the last, some enter late or vanish early, and any may drift
out of the image. A shape is annotated in a frame when at least ``min_area`` of its pixels are
visible there, else its entry is ``null``; identity (the track id) is kept across gaps.
Clip ``i`` of a split is a function of (seed, split, i, preset, size, frames) only.

Layout, under ``$DETECTRON2_DATASETS`` (one folder per parameter set)::

    shapes_vis/<preset>_<S>px_<T>f_s<seed>_<num_train>-<num_val>_v<version>/
      train/JPEGImages/<video id:06d>/<frame:05d>.jpg     (as ytvis_2019/train/JPEGImages)
      train.json                                          YouTube-VIS 2019 JSON, compressed RLE
      val/JPEGImages/...,  val.json

Registered names: ``shapes_vis_train`` / ``shapes_vis_val`` (``DATASETS.SHAPES_VIS``, see
:func:`configure_shapes_vis_from_cfg`), ``evaluator_type="ytvis"``. A split is generated on first
use, under an exclusive file lock, into a temporary folder renamed into place; its JSON is written
last, so a split whose JSON exists is complete.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog

from . import shapes_gen as gen
from .validation import datasets_root
from .ytvis import load_ytvis_json

logger = logging.getLogger(__name__)

__all__ = [
    "ShapesVisSpec",
    "configure_shapes_vis_from_cfg",
    "ensure_generated",
    "ensure_split",
    "register_shapes_vis",
    "render_clip",
]

GENERATOR_VERSION = 1
SPLITS = ("train", "val")
#: fraction of shapes present from the first frame (else they enter at a random frame) and up to
#: the last (else they vanish at a random frame)
P_FROM_START, P_TO_END = 0.7, 0.7
#: speed range of a shape, in image sides per frame
SPEED = (0.01, 0.05)


@dataclass(frozen=True)
class ShapesVisSpec:
    """Parameters of one generated ``shapes_vis`` dataset; ``root`` is DETECTRON2_DATASETS."""

    root: str
    image_size: int = 64
    num_train: int = 120
    num_val: int = 20
    num_frames: int = 8
    seed: int = 0
    preset: str = gen.DEFAULT_PRESET

    def __post_init__(self) -> None:
        gen.get_preset(self.preset)
        low = {"image_size": 16, "num_train": 1, "num_val": 1, "num_frames": 1, "seed": 0}
        for key, minimum in low.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(
                    f"shapes_vis: invalid {key}={value!r} (an integer >= {minimum}; "
                    "DATASETS.SHAPES_VIS)"
                )

    @property
    def tag(self) -> str:
        return (
            f"{self.preset}_{self.image_size}px_{self.num_frames}f_s{self.seed}_"
            f"{self.num_train}-{self.num_val}_v{GENERATOR_VERSION}"
        )

    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.root, "shapes_vis", self.tag)

    def num_videos(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"shapes_vis: unknown split {split!r}; expected one of {SPLITS}")
        return self.num_train if split == "train" else self.num_val

    def image_root(self, split: str) -> str:
        return os.path.join(self.dataset_dir, split, "JPEGImages")

    def json_file(self, split: str) -> str:
        return os.path.join(self.dataset_dir, f"{split}.json")


# ---- rendering --------------------------------------------------------------------------------


@dataclass
class Clip:
    """One rendered clip: ``frames`` [T,S,S,3] uint8 RGB; ``tracks``: per shape, its dataset
    category id and a [T,S,S] bool array of its visible pixels (all False where absent)."""

    frames: np.ndarray
    tracks: list[tuple[int, np.ndarray]]


def render_clip(
    image_size: int, num_frames: int, seed: int, split: str, index: int, preset: str
) -> Clip:
    """Render clip ``index`` of ``split``; the same arguments always give the same clip."""
    s, n_t = int(image_size), int(num_frames)
    p = gen.get_preset(preset)
    rng = gen.image_rng(seed, f"vis-{split}", index)
    stuff_map = gen._stuff_layout(rng, s)
    background = np.zeros((s, s, 3), np.float32)
    painters = gen._STUFF_TEXTURES if p.stuff_textures else gen._FLAT_STUFF
    for cat in gen.STUFF_CATEGORIES:
        tex = painters[cat["name"]](rng, s)
        sel = stuff_map == cat["id"]
        background[sel] = tex[sel]
    r_low, r_high = np.log(p.radius[0]), np.log(p.radius[1])
    shapes = []  # (category index, radius, shape seed, start xy, velocity, [t_in, t_out), texture)
    for _ in range(int(rng.integers(1, p.max_things + 1))):
        cat = int(rng.integers(len(gen.THING_CATEGORIES)))
        name = gen.THING_CATEGORIES[cat]["name"]
        r = max(gen._MIN_RADIUS[name], s * float(np.exp(rng.uniform(r_low, r_high))))
        start = rng.uniform(0.1, 0.9, 2) * s
        angle = rng.uniform(0, 2 * np.pi)
        velocity = rng.uniform(*SPEED) * s * np.array([np.cos(angle), np.sin(angle)])
        t_in = 0 if rng.random() < P_FROM_START or n_t < 3 else int(rng.integers(1, n_t // 2 + 1))
        t_out = n_t if rng.random() < P_TO_END or n_t < 3 else int(rng.integers(t_in + 2, n_t + 1))
        if p.class_colours:
            tex = gen._class_colour(rng, s, name)
        else:
            tex = gen._thing_texture(rng, s, start[0], start[1], r)
        shapes.append((cat, r, int(rng.integers(2**31)), start, velocity, (t_in, t_out), tex))
    min_area = max(6, round(0.001 * s * s))
    frames = np.zeros((n_t, s, s, 3), np.uint8)
    visible = np.zeros((len(shapes), n_t, s, s), bool)
    for t in range(n_t):
        own = np.full((s, s), -1, np.int32)
        for k, (cat, r, shape_seed, start, velocity, (t_in, t_out), _) in enumerate(shapes):
            if t_in <= t < t_out:
                cx, cy = start + velocity * t
                name = gen.THING_CATEGORIES[cat]["name"]
                # the same shape every frame: its drawing RNG restarts from its own seed
                full = gen._thing_mask(np.random.default_rng(shape_seed), name, s, cx, cy, r)
                own[full.astype(bool)] = k
        image = background.copy()
        for k, shape in enumerate(shapes):
            sel = own == k
            image[sel] = shape[6][sel]
            visible[k, t] = sel if sel.sum() >= min_area else False
        image = image + rng.normal(0, 2, image.shape)
        frames[t] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    tracks = [
        (gen.THING_CATEGORIES[shape[0]]["id"], visible[k])
        for k, shape in enumerate(shapes)
        if visible[k].any()
    ]
    return Clip(frames=frames, tracks=tracks)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_split(out_dir: str, spec: ShapesVisSpec, split: str) -> dict:
    """Render every clip of ``split`` into ``out_dir`` (``<split>/JPEGImages`` and
    ``<split>.json``); returns a summary (videos, tracks, annotated frames)."""
    videos, annotations = [], []
    for index in range(spec.num_videos(split)):
        clip = render_clip(spec.image_size, spec.num_frames, spec.seed, split, index, spec.preset)
        video_id = index + 1
        folder = os.path.join(out_dir, split, "JPEGImages", f"{video_id:06d}")
        os.makedirs(folder, exist_ok=True)
        names = []
        for t, frame in enumerate(clip.frames):
            rel = f"{video_id:06d}/{t:05d}.jpg"
            path = os.path.join(out_dir, split, "JPEGImages", rel)
            if not cv2.imwrite(
                path, frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, gen.JPEG_QUALITY]
            ):
                raise OSError(f"shapes_vis: cannot write {path}")
            names.append(rel)
        s = spec.image_size
        videos.append(
            {"id": video_id, "width": s, "height": s, "length": len(names), "file_names": names}
        )
        for category_id, masks in clip.tracks:
            present = [bool(m.any()) for m in masks]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "video_id": video_id,
                    "category_id": category_id,
                    "iscrowd": 0,
                    "width": s,
                    "height": s,
                    "length": 1,
                    "segmentations": [_rle(m) if p else None for m, p in zip(masks, present)],
                    "bboxes": [gen.mask_bbox(m) if p else None for m, p in zip(masks, present)],
                    "areas": [float(m.sum()) if p else None for m, p in zip(masks, present)],
                }
            )
    content = {
        "info": {"description": "QuerySeg synthetic shapes_vis", "split": split, **_params(spec)},
        "licenses": [],
        "videos": videos,
        "annotations": annotations,
        "categories": [
            {"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]}
            for c in gen.THING_CATEGORIES
        ],
    }
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(content, f)
    return {
        "num_videos": len(videos),
        "num_tracks": len(annotations),
        "num_annotated_frames": sum(
            sum(s is not None for s in a["segmentations"]) for a in annotations
        ),
    }


def _params(spec: ShapesVisSpec) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "preset": spec.preset,
        "image_size": spec.image_size,
        "num_frames": spec.num_frames,
        "seed": spec.seed,
        "num_train": spec.num_train,
        "num_val": spec.num_val,
    }


_VERIFIED: set[tuple[ShapesVisSpec, str]] = set()


def ensure_split(spec: ShapesVisSpec, split: str) -> None:
    """Generate ``split`` of ``spec`` unless its JSON is on disk; safe across processes."""
    spec.num_videos(split)
    if (spec, split) in _VERIFIED or os.path.isfile(spec.json_file(split)):
        _VERIFIED.add((spec, split))
        return
    os.makedirs(spec.dataset_dir, exist_ok=True)
    lock_path = os.path.join(os.path.dirname(spec.dataset_dir), f".{spec.tag}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.isfile(spec.json_file(split)):
                _generate_locked(spec, split)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _VERIFIED.add((spec, split))


def _generate_locked(spec: ShapesVisSpec, split: str) -> None:
    for name in os.listdir(spec.dataset_dir):  # leftovers of a killed run (we hold the lock)
        if name.startswith(f".tmp-{split}-"):
            shutil.rmtree(os.path.join(spec.dataset_dir, name), ignore_errors=True)
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=spec.dataset_dir)
    try:
        summary = write_split(tmp, spec, split)
        target = os.path.join(spec.dataset_dir, split)
        if os.path.exists(target):
            shutil.rmtree(target)  # frames of a killed run: its JSON was never written
        os.rename(os.path.join(tmp, split), target)
        os.rename(os.path.join(tmp, f"{split}.json"), spec.json_file(split))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Generated shapes_vis split %r in %s in %.1f s: %s",
        split,
        spec.dataset_dir,
        time.perf_counter() - start,
        summary,
    )


# ---- registration -----------------------------------------------------------------------------

_REGISTERED: dict[str, tuple[ShapesVisSpec, str]] = {}


def ensure_generated(dataset_name: str) -> bool:
    """Generate a registered ``shapes_vis`` dataset if missing; False for any other name."""
    if dataset_name not in _REGISTERED:
        return False
    ensure_split(*_REGISTERED[dataset_name])
    return True


def register_shapes_vis(
    root: str | None = None,
    image_size: int = 64,
    num_train: int = 120,
    num_val: int = 20,
    num_frames: int = 8,
    seed: int = 0,
    preset: str = gen.DEFAULT_PRESET,
    prefix: str = "shapes_vis",
) -> ShapesVisSpec:
    """Register ``<prefix>_train`` / ``<prefix>_val`` (nothing is written until first use).

    Args:
        root: datasets root; default ``$DETECTRON2_DATASETS`` or ``./datasets``.
        image_size: side of the square frames; num_train, num_val: clips per split;
        num_frames: frames per clip; seed: base seed; preset: a ``shapes_gen.PRESETS`` name.
    """
    if root is None:
        root = datasets_root()
    spec = ShapesVisSpec(
        os.path.abspath(root), image_size, num_train, num_val, num_frames, seed, preset
    )
    meta = {
        "thing_classes": [c["name"] for c in gen.THING_CATEGORIES],
        "thing_colors": [c["color"] for c in gen.THING_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(gen.THING_CATEGORIES)
        },
    }
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)

        def load(spec=spec, split=split, name=name) -> list[dict]:
            ensure_split(spec, split)
            return load_ytvis_json(spec.json_file(split), spec.image_root(split), name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=spec.json_file(split),
            image_root=spec.image_root(split),
            evaluator_type="ytvis",
            shapes_preset=preset,
            **meta,
        )
        _REGISTERED[name] = (spec, split)
    return spec


def configure_shapes_vis_from_cfg(cfg) -> ShapesVisSpec:
    """Re-register ``shapes_vis_*`` with ``cfg.DATASETS.SHAPES_VIS``."""
    node = cfg.DATASETS.SHAPES_VIS
    return register_shapes_vis(
        image_size=int(node.IMAGE_SIZE),
        num_train=int(node.NUM_TRAIN),
        num_val=int(node.NUM_VAL),
        num_frames=int(node.NUM_FRAMES),
        seed=int(node.SEED),
        preset=str(node.PRESET),
    )


if __name__.endswith(".shapes_vis"):
    register_shapes_vis()
