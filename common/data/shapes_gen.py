"""Scene generator and file writer of the built-in synthetic ``shapes`` dataset (numpy + OpenCV).

A scene is a square RGB image of background regions ("stuff": sky, grass, water, sand) with shapes
("things": circle, triangle, rectangle, star, ring) stacked on top of each other. How hard a scene
is comes from its :class:`Preset` (``PRESETS``): ``"standard"`` (the default) draws 1-4 shapes of
16-60 px (at 128 px) in a colour of their class over flat stuff, mildly occluded; ``"hard"`` draws
1-6 shapes of any colour and texture over textured stuff, down to 10 % visible and 6 px small (the
only look of generator version 1, reproduced bit for bit). Draw order is depth: a shape hides what
it covers, its mask is what stays visible, and shapes left too small or mostly hidden are removed
before the image is painted. The image is painted from the final label map, so image, instance,
panoptic and semantic labels agree pixel for pixel. Every image is generated from its own seed
derived from (seed, split, index), so any image can be regenerated alone (``render_scene``).

``write_split`` writes one split in the layouts of Detectron2's builtin datasets (see
``common/data/shapes.py`` for the folder layout and the registered names).
"""

from __future__ import annotations

import colorsys
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

# Category ids are COCO-like: non-contiguous, things first, then stuff.
THING_CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "color": [220, 20, 60]},
    {"id": 2, "name": "triangle", "color": [0, 130, 200]},
    {"id": 4, "name": "rectangle", "color": [255, 180, 0]},
    {"id": 5, "name": "star", "color": [145, 30, 180]},
    {"id": 7, "name": "ring", "color": [240, 50, 230]},
]
STUFF_CATEGORIES: list[dict] = [
    {"id": 10, "name": "sky", "color": [135, 206, 235]},
    {"id": 12, "name": "grass", "color": [34, 139, 34]},
    {"id": 13, "name": "water", "color": [25, 25, 112]},
    {"id": 15, "name": "sand", "color": [210, 180, 140]},
]
for _c in THING_CATEGORIES:
    _c.update(isthing=1, supercategory="shape")
for _c in STUFF_CATEGORIES:
    _c.update(isthing=0, supercategory="background")
CATEGORIES: list[dict] = THING_CATEGORIES + STUFF_CATEGORIES

#: Value of the "ignore" label in the semantic PNGs (no pixel of ``shapes`` carries it).
IGNORE_LABEL = 255
#: Panoptic segment id = category_id * LABEL_DIVISOR + instance number (0 for stuff).
LABEL_DIVISOR = 1000
#: Every EMPTY_PERIOD-th image (index % EMPTY_PERIOD == EMPTY_OFFSET) has no things (~3 %).
EMPTY_PERIOD, EMPTY_OFFSET = 32, 7
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Preset:
    """How hard ``shapes`` scenes are. Every preset has the same 5 thing and 4 stuff classes.

    Attributes:
        name: the preset's name (``DATASETS.SHAPES.PRESET``; part of the dataset folder's name).
        max_things: 1..max_things shapes per image (empty images are added regardless).
        radius: (low, high) shape radius as a fraction of the image side, drawn log-uniformly.
        min_visible: a shape less visible than this fraction of its full area is removed.
        class_colours: True: a shape is painted, flat, in its class's hue (``CLASS_HUES``, with a
            little jitter); False: random colours and textures (stripes, gradient, speckle).
        stuff_textures: True: sky/grass/water/sand textures; False: flat colours with mild noise.
    """

    name: str
    max_things: int
    radius: tuple[float, float]
    min_visible: float
    class_colours: bool
    stuff_textures: bool


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "standard",
            max_things=4,
            radius=(0.0625, 0.23),
            min_visible=0.6,
            class_colours=True,
            stuff_textures=False,
        ),
        Preset(
            "hard",
            max_things=6,
            radius=(0.05, 0.32),
            min_visible=0.1,
            class_colours=False,
            stuff_textures=True,
        ),
    )
}
DEFAULT_PRESET = "standard"
#: Hue (degrees) of each thing class under ``class_colours``: far from the stuff hues and apart.
CLASS_HUES = {"circle": 0.0, "triangle": 55.0, "rectangle": 170.0, "star": 250.0, "ring": 305.0}


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``; a ValueError lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"shapes: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass
class Thing:
    """One visible shape: ``category_id`` (dataset id) and ``mask`` [H,W] bool (visible part)."""

    category_id: int
    mask: np.ndarray
    segment_id: int


@dataclass
class Scene:
    """One rendered scene.

    Attributes:
        image: [H,W,3] uint8 RGB.
        things: visible shapes, bottom to top.
        stuff_map: [H,W] int32 stuff category id of every pixel (the region under the shapes).
        segment_ids: [H,W] int32 panoptic segment id of every pixel (never 0: no void).
    """

    image: np.ndarray
    things: list[Thing] = field(default_factory=list)
    stuff_map: np.ndarray | None = None
    segment_ids: np.ndarray | None = None


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of image ``index`` of ``split``; independent of the split's size."""
    if seed < 0 or index < 0:
        raise ValueError(f"shapes: seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def _rgb(hue: float, sat: float, val: float) -> np.ndarray:
    """HSV (hue in degrees, sat/val in [0,1]) -> [3] float32 RGB in [0,255]."""
    return np.array(colorsys.hsv_to_rgb((hue % 360) / 360, sat, val), np.float32) * 255


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[size,size] float32 smooth random field, roughly unit variance, ``cells`` bumps a side."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre grids (y, x), each [size,size] float32."""
    ax = np.arange(size, dtype=np.float32)
    return np.meshgrid(ax, ax, indexing="ij")


# ---- stuff textures: each returns [S,S,3] float32 RGB ------------------------------------


def _sky(rng: np.random.Generator, s: int) -> np.ndarray:
    """Light blue vertical gradient with soft white clouds."""
    hue = rng.uniform(195, 215)
    top = _rgb(hue, rng.uniform(0.35, 0.6), rng.uniform(0.85, 1.0))
    bottom = _rgb(hue + rng.uniform(-5, 5), rng.uniform(0.1, 0.25), rng.uniform(0.9, 1.0))
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t
    clouds = np.clip((_smooth_noise(rng, s, int(rng.integers(2, 5))) - 0.2) * 0.6, 0, 0.8)
    img = img * (1 - clouds[..., None]) + 245 * clouds[..., None]
    return img + rng.normal(0, 2, img.shape).astype(np.float32)


def _grass(rng: np.random.Generator, s: int) -> np.ndarray:
    """Green with vertical blade streaks."""
    base = _rgb(rng.uniform(85, 130), rng.uniform(0.5, 0.85), rng.uniform(0.35, 0.6))
    blades = cv2.blur(rng.standard_normal((s, s)).astype(np.float32), (1, 5))
    blades /= blades.std() + 1e-6
    shade = 1 + 0.22 * blades + 0.1 * _smooth_noise(rng, s, 3)
    return base * shade[..., None]


def _water(rng: np.random.Generator, s: int) -> np.ndarray:
    """Deep blue/teal with horizontal ripples and glints."""
    base = _rgb(rng.uniform(185, 230), rng.uniform(0.6, 0.95), rng.uniform(0.35, 0.6))
    y, x = _coords(s)
    amp, wave, phase = rng.uniform(0.5, 2.0), rng.uniform(12, 30), rng.uniform(0, 2 * np.pi)
    wobble = amp * np.sin(2 * np.pi * x / wave + phase)
    ripple = np.sin(2 * np.pi * (y + wobble) / rng.uniform(3.5, 7) + rng.uniform(0, 2 * np.pi))
    img = base * (1 + 0.2 * ripple + 0.05 * _smooth_noise(rng, s, 4))[..., None]
    glint = np.clip(ripple - 0.8, 0, None)[..., None] * 3
    return img * (1 - glint) + 230 * glint


def _sand(rng: np.random.Generator, s: int) -> np.ndarray:
    """Beige with fine grain, dark specks and faint dunes."""
    base = _rgb(rng.uniform(32, 50), rng.uniform(0.3, 0.55), rng.uniform(0.7, 0.92))
    shade = 1 + 0.12 * rng.standard_normal((s, s)).astype(np.float32)
    shade += 0.08 * _smooth_noise(rng, s, 3)
    shade[rng.random((s, s)) < 0.03] *= 0.6
    return base * shade[..., None]


_STUFF_TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "sky": _sky,
    "grass": _grass,
    "water": _water,
    "sand": _sand,
}


def _flat_stuff(name: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    """A flat version of a stuff texture: its hue range, no pattern, mild pixel noise."""
    hsv = {
        "sky": ((195, 215), (0.35, 0.6), (0.85, 1.0)),
        "grass": ((85, 130), (0.5, 0.85), (0.35, 0.6)),
        "water": ((185, 230), (0.6, 0.95), (0.25, 0.45)),
        "sand": ((32, 50), (0.3, 0.55), (0.7, 0.92)),
    }[name]

    def paint(rng: np.random.Generator, s: int) -> np.ndarray:
        c = _rgb(*(rng.uniform(lo, hi) for lo, hi in hsv))
        return np.broadcast_to(c, (s, s, 3)) + rng.normal(0, 4, (s, s, 3)).astype(np.float32)

    return paint


_FLAT_STUFF = {name: _flat_stuff(name) for name in _STUFF_TEXTURES}


def _stuff_layout(rng: np.random.Generator, s: int) -> np.ndarray:
    """[S,S] int32 stuff category id per pixel: argmax of smooth random fields (smooth borders)."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.1, 0.4, 0.35, 0.15]))
    chosen = rng.choice(len(STUFF_CATEGORIES), size=n, replace=False)
    y, _ = _coords(s)
    fields = []
    for c in chosen:
        f = _smooth_noise(rng, s, int(rng.integers(1, 4))) + rng.normal(0, 0.3)
        if STUFF_CATEGORIES[c]["name"] == "sky":  # sky prefers the top, as in photos
            f += 1.5 * (0.5 - y / s)
        fields.append(f)
    ids = np.array([STUFF_CATEGORIES[c]["id"] for c in chosen], np.int32)
    return ids[np.argmax(np.stack(fields), axis=0)]


# ---- things ---------------------------------------------------------------------------------


def _thing_texture(rng: np.random.Generator, s: int, cx: float, cy: float, r: float) -> np.ndarray:
    """[S,S,3] float32 random colour with one of: flat, stripes, gradient, speckle."""

    def colour() -> np.ndarray:
        return _rgb(rng.uniform(0, 360), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0))

    c1, c2 = colour(), colour()
    y, x = _coords(s)
    angle = rng.uniform(0, np.pi)
    proj = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    kind = int(rng.integers(4))
    if kind == 0:  # flat
        img = np.broadcast_to(c1, (s, s, 3)) + rng.normal(0, 5, (s, s, 3))
    elif kind == 1:  # stripes
        on = (np.floor(proj / rng.uniform(3, 10)) % 2 == 0)[..., None]
        img = np.where(on, c1, c2) + rng.normal(0, 4, (s, s, 3))
    elif kind == 2:  # gradient across the shape
        t = np.clip((proj + r) / (2 * r), 0, 1)[..., None]
        img = c1 * (1 - t) + c2 * t
    else:  # speckle
        img = np.broadcast_to(c1, (s, s, 3)) + rng.normal(0, 22, (s, s, 3))
    return img.astype(np.float32)


def _class_colour(rng: np.random.Generator, s: int, name: str) -> np.ndarray:
    """[S,S,3] float32: the class hue of ``name`` (jittered), flat, with mild pixel noise."""
    c = _rgb(CLASS_HUES[name] + rng.uniform(-8, 8), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
    return (np.broadcast_to(c, (s, s, 3)) + rng.normal(0, 4, (s, s, 3))).astype(np.float32)


def _regular(cx: float, cy: float, radii: np.ndarray, theta: float) -> np.ndarray:
    """[N,2] vertices at equal angular steps from ``theta`` with the given radii."""
    ang = theta + 2 * np.pi * np.arange(len(radii)) / len(radii)
    return np.stack([cx + radii * np.cos(ang), cy + radii * np.sin(ang)], axis=1)


def _fill(mask: np.ndarray, poly: np.ndarray, value: int) -> None:
    """Rasterise float polygon [N,2] (x, y) into ``mask`` with 1/16-pixel vertex precision."""
    pts = np.round(poly * 16).astype(np.int32)[None]
    cv2.fillPoly(mask, pts, value, lineType=cv2.LINE_8, shift=4)


def _thing_mask(rng: np.random.Generator, name: str, s: int, cx: float, cy: float, r: float):
    """[S,S] uint8 full (unoccluded) mask of one shape of class ``name``."""
    mask = np.zeros((s, s), np.uint8)
    theta = rng.uniform(0, 2 * np.pi)
    if name in ("circle", "ring"):
        n = max(24, int(2 * np.pi * r / 2))
        _fill(mask, _regular(cx, cy, np.full(n, r), 0.0), 1)
        if name == "ring":
            _fill(mask, _regular(cx, cy, np.full(n, r * rng.uniform(0.45, 0.62)), 0.0), 0)
    elif name == "triangle":
        ang = theta + np.deg2rad([0, 120, 240] + rng.uniform(-12, 12, 3))
        rad = r * rng.uniform(0.85, 1.1, 3)
        _fill(mask, np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1), 1)
    elif name == "rectangle":
        hw, hh = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.35, 0.8)
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        _fill(mask, corners @ rot.T + [cx, cy], 1)
    elif name == "star":
        radii = np.tile([r, r * rng.uniform(0.38, 0.5)], 5)
        _fill(mask, _regular(cx, cy, radii, theta), 1)
    else:
        raise ValueError(f"shapes: unknown thing class {name!r}")
    return mask


_MIN_RADIUS = {"circle": 3.0, "triangle": 4.0, "rectangle": 3.5, "star": 5.0, "ring": 6.0}


def render_scene(
    image_size: int, seed: int, split: str, index: int, preset: str = DEFAULT_PRESET
) -> Scene:
    """Render image ``index`` of ``split`` under ``preset`` (a ``PRESETS`` name); the same
    arguments always give the same scene.

    Returns:
        Scene with image [S,S,3] uint8, visible thing masks [S,S] bool, stuff_map and segment_ids
        [S,S] int32, S = ``image_size``.
    """
    s = int(image_size)
    if s < 16:
        raise ValueError(f"shapes: image_size must be >= 16 pixels, got {image_size}")
    p = get_preset(preset)
    rng = image_rng(seed, split, index)
    stuff_map = _stuff_layout(rng, s)
    num = 0 if index % EMPTY_PERIOD == EMPTY_OFFSET else int(rng.integers(1, p.max_things + 1))
    r_low, r_high = np.log(p.radius[0]), np.log(p.radius[1])
    min_area = max(6, round(0.001 * s * s))

    shapes = []  # (category index, full mask, texture), bottom to top
    for _ in range(num):
        cat = int(rng.integers(len(THING_CATEGORIES)))
        name = THING_CATEGORIES[cat]["name"]
        r = max(_MIN_RADIUS[name], s * float(np.exp(rng.uniform(r_low, r_high))))
        cx, cy = rng.uniform(0.05, 0.95, 2) * s
        full = _thing_mask(rng, name, s, cx, cy, r).astype(bool)
        if p.class_colours:
            tex = _class_colour(rng, s, name)
        else:
            tex = _thing_texture(rng, s, cx, cy, r)
        shapes.append((cat, full, tex))

    def owners(keep: list[int]) -> np.ndarray:
        own = np.full((s, s), -1, np.int32)
        for k in keep:
            own[shapes[k][1]] = k
        return own

    keep = list(range(len(shapes)))
    own = owners(keep)
    visible = np.bincount(own.ravel() + 1, minlength=len(shapes) + 1)[1:]
    kept = [
        k
        for k in keep
        if visible[k] >= min_area and visible[k] >= p.min_visible * shapes[k][1].sum()
    ]
    if kept != keep:  # removing a shape only uncovers the ones below it: one pass suffices
        own = owners(kept)

    image = np.zeros((s, s, 3), np.float32)
    painters = _STUFF_TEXTURES if p.stuff_textures else _FLAT_STUFF
    for cat in STUFF_CATEGORIES:  # draw every texture, keep the stream independent of the layout
        tex = painters[cat["name"]](rng, s)
        sel = stuff_map == cat["id"]
        image[sel] = tex[sel]
    segment_ids = stuff_map * LABEL_DIVISOR
    things = []
    for j, k in enumerate(kept):
        cat, _, tex = shapes[k]
        sel = own == k
        image[sel] = tex[sel]
        cid = THING_CATEGORIES[cat]["id"]
        segment_ids[sel] = cid * LABEL_DIVISOR + j + 1
        things.append(Thing(category_id=cid, mask=sel, segment_id=cid * LABEL_DIVISOR + j + 1))
    image = image * rng.uniform(0.9, 1.1) + rng.normal(0, 2, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Scene(image=image, things=things, stuff_map=stuff_map, segment_ids=segment_ids)


# ---- annotation encoders --------------------------------------------------------------------


def _simplify(poly: np.ndarray) -> np.ndarray:
    """Drop repeated vertices and middle vertices of straight runs of a closed polygon [N,2]."""
    poly = poly[np.any(poly != np.roll(poly, 1, axis=0), axis=1)]
    if len(poly) < 3:
        return poly
    prev, nxt = np.roll(poly, 1, axis=0), np.roll(poly, -1, axis=0)
    d1, d2 = poly - prev, nxt - poly
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    straight = (cross == 0) & ((d1 * d2).sum(1) > 0)
    return poly[~straight]


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons of a binary mask, exact under COCO's rasteriser (``annToMask``).

    The outline is traced with ``cv2.findContours`` on the mask upsampled 2x, so each contour
    vertex sits a quarter pixel inside a pixel edge; rounding moves it onto the pixel corner, which
    gives the exact pixel outline (also exact after flips and integer rescaling). Holes are joined
    to their outer contour by a zero-width cut, as COCO polygons cannot hold holes. One polygon per
    connected part.

    Args:
        mask: [H,W] bool/uint8.

    Returns:
        list of flat [x0, y0, x1, y1, ...] lists in absolute pixel coordinates.
    """
    up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:  # a hole: handled with its parent
            continue
        poly = contour.reshape(-1, 2).astype(np.float64)
        child = hierarchy[i][2]
        while child != -1:
            hole = contours[child].reshape(-1, 2).astype(np.float64)
            dist = ((poly[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
            a, b = np.unravel_index(np.argmin(dist), dist.shape)
            poly = np.concatenate([poly[: a + 1], hole[b:], hole[: b + 1], poly[a:]])
            child = hierarchy[child][0]
        poly = _simplify(np.round((poly + 0.5) / 2))
        if len(poly) >= 3:
            polygons.append([float(v) for v in poly.ravel()])
    return polygons


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO [x, y, w, h] of a [H,W] bool mask, pixel-edge based (as pycocotools' toBbox)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic id colours (as ``panopticapi.utils.id2rgb``): [H,W] int -> [H,W,3] uint8."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def contiguous_semantic(scene: Scene) -> np.ndarray:
    """[H,W] uint8 semantic labels, contiguous over all classes (things first), 255 = ignore."""
    lut = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    sem = np.full(scene.segment_ids.shape, IGNORE_LABEL, np.uint8)
    for cid, i in lut.items():
        sem[scene.segment_ids // LABEL_DIVISOR == cid] = i
    return sem


def panoptic_fpn_semantic(scene: Scene) -> np.ndarray:
    """[H,W] uint8 Panoptic-FPN stuff labels: 0 = things, 1.. = stuff classes, 255 = void."""
    sem = np.zeros(scene.segment_ids.shape, np.uint8)  # things -> 0
    is_stuff = scene.segment_ids % LABEL_DIVISOR == 0
    for i, c in enumerate(STUFF_CATEGORIES):
        sem[is_stuff & (scene.stuff_map == c["id"])] = i + 1
    return sem


# ---- split writer ---------------------------------------------------------------------------


def split_paths(split: str) -> dict[str, str]:
    """Relative paths (inside a dataset folder) of everything one split consists of."""
    return {
        "image_root": split,
        "instances_json": f"annotations/instances_{split}.json",
        "panoptic_json": f"annotations/panoptic_{split}.json",
        "panoptic_root": f"panoptic_{split}",
        "panoptic_stuff_root": f"panoptic_stuff_{split}",
        "sem_seg_root": f"annotations_detectron2/{split}",
    }


def file_stem(image_id: int) -> str:
    """File name without extension of an image, COCO style (12 digits)."""
    return f"{image_id:012d}"


def _write_png(path: str, rgb_or_gray: np.ndarray) -> None:
    arr = rgb_or_gray[..., ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    if not cv2.imwrite(path, np.ascontiguousarray(arr)):
        raise OSError(f"shapes: cannot write {path}")


def write_split(
    out_dir: str,
    split: str,
    num_images: int,
    image_size: int,
    seed: int,
    preset: str = DEFAULT_PRESET,
) -> dict:
    """Render ``num_images`` scenes of ``split`` (``preset``) and write them under ``out_dir``.

    Writes (paths relative to ``out_dir``, see ``split_paths``): ``<split>/*.jpg`` (JPEG quality
    95), ``annotations/instances_<split>.json`` and ``annotations/panoptic_<split>.json``,
    ``panoptic_<split>/*.png`` (RGB ids), ``panoptic_stuff_<split>/*.png`` and
    ``annotations_detectron2/<split>/*.png``. Image ids are ``index + 1``.

    Returns:
        summary dict: num_images, num_instances, num_empty_images.
    """
    rel = split_paths(split)
    for key in ("image_root", "panoptic_root", "panoptic_stuff_root", "sem_seg_root"):
        os.makedirs(os.path.join(out_dir, rel[key]), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, instances, panoptic = [], [], []
    for index in range(num_images):
        scene = render_scene(image_size, seed, split, index, preset)
        image_id, stem = index + 1, file_stem(index + 1)
        jpg = os.path.join(out_dir, rel["image_root"], stem + ".jpg")
        if not cv2.imwrite(jpg, scene.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"shapes: cannot write {jpg}")
        _write_png(
            os.path.join(out_dir, rel["panoptic_root"], stem + ".png"), id2rgb(scene.segment_ids)
        )
        _write_png(
            os.path.join(out_dir, rel["panoptic_stuff_root"], stem + ".png"),
            panoptic_fpn_semantic(scene),
        )
        _write_png(
            os.path.join(out_dir, rel["sem_seg_root"], stem + ".png"), contiguous_semantic(scene)
        )
        images.append(
            {"id": image_id, "file_name": stem + ".jpg", "height": image_size, "width": image_size}
        )
        for thing in scene.things:
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": thing.category_id,
                    "iscrowd": 0,
                    "segmentation": mask_to_polygons(thing.mask),
                    "area": float(thing.mask.sum()),
                    "bbox": mask_bbox(thing.mask),
                }
            )
        segments = []
        ids, counts = np.unique(scene.segment_ids, return_counts=True)
        for sid, count in zip(ids.tolist(), counts.tolist()):
            segments.append(
                {
                    "id": sid,
                    "category_id": sid // LABEL_DIVISOR,
                    "iscrowd": 0,
                    "area": count,
                    "bbox": mask_bbox(scene.segment_ids == sid),
                }
            )
        segments.sort(key=lambda seg: (seg["id"] % LABEL_DIVISOR == 0, seg["id"]))  # things 1st
        panoptic.append(
            {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}
        )
    info = {
        "description": "QuerySeg synthetic shapes",
        "split": split,
        "seed": seed,
        "image_size": image_size,
        "preset": preset,
        "version": "2",
    }
    keys = ("id", "name", "supercategory")
    inst_json = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": instances,
        "categories": [{k: c[k] for k in keys} for c in THING_CATEGORIES],
    }
    pan_json = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": panoptic,
        "categories": [dict(c) for c in CATEGORIES],
    }
    for key, content in (("instances_json", inst_json), ("panoptic_json", pan_json)):
        with open(os.path.join(out_dir, rel[key]), "w") as f:
            json.dump(content, f)
    return {
        "num_images": num_images,
        "num_instances": len(instances),
        "num_empty_images": sum(
            1 for p in panoptic if all(s["id"] % LABEL_DIVISOR == 0 for s in p["segments_info"])
        ),
    }
