"""The built-in synthetic ``shapes`` dataset: on-disk layout, lazy generation and registration.

Scenes (see ``shapes_gen``): 5 thing classes (circle, triangle, rectangle, star, ring), occluding
each other, over 4 stuff classes (sky, grass, water, sand); how hard they are is a named preset
(``shapes_gen.PRESETS``: ``standard`` by default, ``hard`` for textured, small and heavily occluded
shapes). Category ids are non-contiguous (things 1, 2, 4, 5, 7; stuff 10, 12, 13, 15); contiguous
ids put things first, then stuff.

Layout, under ``$DETECTRON2_DATASETS`` (default ``./datasets``), one folder per parameter set
(preset included, so two presets never share a file)::

    shapes/<preset>_<S>px_s<seed>_<num_train>-<num_val>_v<version>/
      meta.json                             generation parameters and finished splits
      train/000000000001.jpg ...            images, JPEG quality 95      (COCO: train2017/)
      annotations/instances_train.json      COCO instances, polygons     (COCO)
      annotations/panoptic_train.json       COCO panoptic segments_info  (COCO panoptic)
      panoptic_train/000000000001.png       COCO panoptic RGB-id PNGs    (COCO panoptic)
      panoptic_stuff_train/*.png            0 = things, 1.. = stuff      (prepare_panoptic_fpn.py)
      annotations_detectron2/train/*.png    0..8 over all classes        (ADE20K; also the
                                                                          sem. labels of panoptic)
      ... the same for ``val``

Registered names (``prefix`` = "shapes"), as Detectron2 / Mask2Former register COCO and ADE20K.
``shapes_*`` follow ``DATASETS.SHAPES`` (``configure_shapes_from_cfg``); every preset is also
registered under ``shapes_<preset>_*`` (e.g. ``shapes_hard_val``), and each name's metadata
records its ``shapes_preset``:

- ``shapes_{train,val}``: COCO instances (``register_coco_instances``), evaluator "coco".
- ``shapes_{train,val}_panoptic``: standard panoptic (``register_coco_panoptic``) with
  Mask2Former's metadata: ``stuff_classes`` lists all classes, ``json_file`` is the instance
  JSON, ``sem_seg_root`` and per-image ``sem_seg_file_name`` give semantic labels.
- ``shapes_{train,val}_panoptic_separated`` (+ ``_stuffonly``): Panoptic FPN style
  (``register_coco_panoptic_separated``).
- ``shapes_sem_seg_{train,val}``: ADE20K style (``load_sem_seg``), evaluator "sem_seg".

A split is generated on first use (``DatasetCatalog.get`` of any name of that split), into a
temporary folder that is then renamed into place, under an exclusive file lock, so several
processes can ask for it at once. ``meta.json`` lists a split only once all its files are there.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import (
    load_sem_seg,
    register_coco_instances,
    register_coco_panoptic,
    register_coco_panoptic_separated,
)

from . import shapes_gen as gen
from . import shapes_vis
from .validation import datasets_root

logger = logging.getLogger(__name__)

__all__ = [
    "ShapesSpec",
    "configure_shapes_from_cfg",
    "ensure_generated",
    "ensure_split",
    "register_presets",
    "register_shapes",
]

GENERATOR_VERSION = 2  # 2: presets (``hard`` is version 1's look, bit for bit)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of one generated ``shapes`` dataset; ``root`` is the DETECTRON2_DATASETS dir."""

    root: str
    image_size: int = 128
    num_train: int = 600
    num_val: int = 100
    seed: int = 0
    preset: str = gen.DEFAULT_PRESET

    def __post_init__(self) -> None:
        gen.get_preset(self.preset)  # a ValueError naming the known presets
        minimum = {"image_size": 16, "num_train": 1, "num_val": 1, "seed": 0}
        for key, low in minimum.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(
                    f"shapes: invalid {key}={value!r} (image_size >= 16, num_train/num_val >= 1, "
                    "seed >= 0, all integers)"
                )

    @property
    def tag(self) -> str:
        """Folder name encoding every parameter, so changed parameters never reuse stale data."""
        return (
            f"{self.preset}_{self.image_size}px_s{self.seed}_{self.num_train}-{self.num_val}"
            f"_v{GENERATOR_VERSION}"
        )

    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.root, "shapes", self.tag)

    def num_images(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"shapes: unknown split {split!r}; expected one of {SPLITS}")
        return self.num_train if split == "train" else self.num_val

    def params(self) -> dict:
        """The generation parameters recorded in ``meta.json``."""
        return {
            "generator_version": GENERATOR_VERSION,
            "preset": self.preset,
            "image_size": self.image_size,
            "seed": self.seed,
            "num_train": self.num_train,
            "num_val": self.num_val,
        }

    def path(self, split: str, key: str) -> str:
        """Absolute path of item ``key`` of ``split`` (keys of ``shapes_gen.split_paths``)."""
        return os.path.join(self.dataset_dir, gen.split_paths(split)[key])


# ---- generation -----------------------------------------------------------------------------


def _read_meta(spec: ShapesSpec) -> dict | None:
    path = os.path.join(spec.dataset_dir, "meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"shapes: cannot read {path} ({e}); delete {spec.dataset_dir}") from e
    recorded = {k: meta.get(k) for k in spec.params()}
    if recorded != spec.params():
        raise RuntimeError(
            f"shapes: {path} records parameters {recorded}, but the folder name says "
            f"{spec.params()}; delete {spec.dataset_dir} to regenerate it"
        )
    return meta


def _write_meta(spec: ShapesSpec, meta: dict) -> None:
    path = os.path.join(spec.dataset_dir, "meta.json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one


def _check_complete(spec: ShapesSpec, split: str) -> None:
    """Raise naming the first missing file/folder of a split that meta.json calls finished."""
    n = spec.num_images(split)
    for key in gen.split_paths(split):
        path = spec.path(split, key)
        if key.endswith("_json"):
            ok = os.path.isfile(path)
        else:
            ok = os.path.isdir(path) and len(os.listdir(path)) == n
        if not ok:
            raise FileNotFoundError(
                f"shapes: {path} is missing or incomplete (expected {n} images of split "
                f"{split!r}); delete {spec.dataset_dir} to regenerate it"
            )


_VERIFIED: set[tuple[ShapesSpec, str]] = set()


def ensure_split(spec: ShapesSpec, split: str) -> None:
    """Generate ``split`` of ``spec`` unless it is already on disk. Safe across processes.

    The split is written into a temporary folder inside the dataset folder, its items are renamed
    into place, and only then is it recorded in ``meta.json``; an exclusive ``fcntl`` lock on
    ``shapes/.<tag>.lock`` serialises writers.
    """
    spec.num_images(split)  # validates the split name
    if (spec, split) in _VERIFIED:
        return
    meta = _read_meta(spec)
    if meta is None or split not in meta.get("splits", {}):
        os.makedirs(os.path.dirname(spec.dataset_dir), exist_ok=True)
        lock_path = os.path.join(os.path.dirname(spec.dataset_dir), f".{spec.tag}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                meta = _read_meta(spec)  # another process may have finished meanwhile
                if meta is None or split not in meta.get("splits", {}):
                    _generate_locked(spec, split, meta)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    _check_complete(spec, split)
    _VERIFIED.add((spec, split))


def _generate_locked(spec: ShapesSpec, split: str, meta: dict | None) -> None:
    os.makedirs(spec.dataset_dir, exist_ok=True)
    for name in os.listdir(spec.dataset_dir):  # leftovers of a killed run (we hold the lock)
        if name.startswith(f".tmp-{split}-"):
            shutil.rmtree(os.path.join(spec.dataset_dir, name), ignore_errors=True)
    n = spec.num_images(split)
    logger.info(
        "Generating shapes split %r: %d images of %dpx (preset %s, seed %d) in %s",
        split,
        n,
        spec.image_size,
        spec.preset,
        spec.seed,
        spec.dataset_dir,
    )
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=spec.dataset_dir)
    try:
        summary = gen.write_split(tmp, split, n, spec.image_size, spec.seed, spec.preset)
        for rel in gen.split_paths(split).values():
            target = os.path.join(spec.dataset_dir, rel)
            if os.path.isdir(target):
                shutil.rmtree(target)  # a partial item of a killed run: not listed in meta.json
            elif os.path.exists(target):
                os.remove(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(tmp, rel), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    preset = dataclasses.asdict(gen.get_preset(spec.preset))
    meta = meta or {
        **spec.params(),
        "preset_settings": preset,
        "categories": gen.CATEGORIES,
        "splits": {},
    }
    meta["splits"][split] = summary
    _write_meta(spec, meta)
    logger.info(
        "Generated shapes split %r in %.1f s: %s", split, time.perf_counter() - start, summary
    )


# ---- registration -----------------------------------------------------------------------------

#: registered dataset name -> (spec, split), for ``ensure_generated``.
_REGISTERED: dict[str, tuple[ShapesSpec, str]] = {}


def ensure_generated(dataset_name: str) -> bool:
    """Generate the files of a registered ``shapes`` dataset if missing.

    Returns:
        True if ``dataset_name`` is a ``shapes`` dataset (now on disk), False for any other name.
    """
    if dataset_name not in _REGISTERED:
        return shapes_vis.ensure_generated(dataset_name)
    ensure_split(*_REGISTERED[dataset_name])
    return True


def _thing_meta() -> dict:
    return {
        "thing_classes": [c["name"] for c in gen.THING_CATEGORIES],
        "thing_colors": [c["color"] for c in gen.THING_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(gen.THING_CATEGORIES)
        },
    }


def _all_classes_as_stuff() -> dict:
    """stuff_* covering every class (things first), as Mask2Former / ADE20K-style sem seg."""
    return {
        "stuff_classes": [c["name"] for c in gen.CATEGORIES],
        "stuff_colors": [c["color"] for c in gen.CATEGORIES],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(gen.CATEGORIES)},
    }


def _separated_meta() -> dict:
    """As detectron2's ``coco_panoptic_separated``: stuff 1.. plus the 'things' class 0."""
    stuff = gen.STUFF_CATEGORIES
    meta = _thing_meta()
    meta["stuff_classes"] = ["things"] + [c["name"] for c in stuff]
    meta["stuff_colors"] = [[82, 18, 128]] + [c["color"] for c in stuff]
    meta["stuff_dataset_id_to_contiguous_id"] = {
        0: 0,
        **{c["id"]: i + 1 for i, c in enumerate(stuff)},
    }
    return meta


def _replace(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _make_lazy(name: str, spec: ShapesSpec, split: str, add_sem_seg: bool = False) -> None:
    """Wrap the loader Detectron2 registered for ``name`` so that it generates the split first."""
    loader = DatasetCatalog[name]  # the raw function (DatasetCatalog.get would call it)
    sem_root = spec.path(split, "sem_seg_root")

    def load() -> list[dict]:
        ensure_split(spec, split)
        dicts = loader()
        for d in dicts:
            # the panoptic and semantic loaders leave the (known) image size out
            d.setdefault("height", spec.image_size)
            d.setdefault("width", spec.image_size)
            if add_sem_seg:
                stem = os.path.splitext(os.path.basename(d["pan_seg_file_name"]))[0]
                d["sem_seg_file_name"] = os.path.join(sem_root, stem + ".png")
        return dicts

    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    _REGISTERED[name] = (spec, split)


def register_shapes(
    root: str | None = None,
    image_size: int = 128,
    num_train: int = 600,
    num_val: int = 100,
    seed: int = 0,
    prefix: str = "shapes",
    preset: str = gen.DEFAULT_PRESET,
) -> ShapesSpec:
    """Register every ``<prefix>_*`` dataset name (see the module docstring); nothing is written.

    Re-registering replaces the previous registration of the same names. Files are generated on
    the first ``DatasetCatalog.get`` of a split (or by ``ensure_split``).

    Args:
        root: datasets root; default ``$DETECTRON2_DATASETS`` or ``./datasets``.
        image_size: side of the square images in pixels.
        num_train, num_val: number of images per split.
        seed: base seed; image i of a split is a function of (seed, split, i, preset) only.
        prefix: name prefix, e.g. "shapes" -> "shapes_train", "shapes_sem_seg_val", ...
        preset: a ``shapes_gen.PRESETS`` name (how hard the scenes are).

    Returns:
        the ShapesSpec (``.dataset_dir`` is the folder holding the files).
    """
    if root is None:
        root = datasets_root()
    spec = ShapesSpec(os.path.abspath(root), image_size, num_train, num_val, seed, preset)
    for split in SPLITS:
        image_root = spec.path(split, "image_root")
        inst_json = spec.path(split, "instances_json")
        pan_root, pan_json = spec.path(split, "panoptic_root"), spec.path(split, "panoptic_json")
        sem_root = spec.path(split, "sem_seg_root")
        inst, pan = f"{prefix}_{split}", f"{prefix}_{split}_panoptic"
        sem = f"{prefix}_sem_seg_{split}"
        for name in (inst, pan, pan + "_separated", pan + "_stuffonly", sem):
            _replace(name)

        register_coco_instances(inst, _thing_meta(), inst_json, image_root)
        _make_lazy(inst, spec, split)

        register_coco_panoptic(
            pan,
            {**_thing_meta(), **_all_classes_as_stuff()},
            image_root,
            pan_root,
            pan_json,
            inst_json,
        )
        MetadataCatalog.get(pan).set(sem_seg_root=sem_root)
        _make_lazy(pan, spec, split, add_sem_seg=True)

        register_coco_panoptic_separated(
            pan,
            _separated_meta(),
            image_root,
            pan_root,
            pan_json,
            spec.path(split, "panoptic_stuff_root"),
            inst_json,
        )
        _make_lazy(pan + "_separated", spec, split)
        _make_lazy(pan + "_stuffonly", spec, split)

        DatasetCatalog.register(
            sem, lambda g=sem_root, i=image_root: load_sem_seg(g, i, gt_ext="png", image_ext="jpg")
        )
        MetadataCatalog.get(sem).set(
            image_root=image_root,
            sem_seg_root=sem_root,
            evaluator_type="sem_seg",
            ignore_label=gen.IGNORE_LABEL,
            **_all_classes_as_stuff(),
        )
        _make_lazy(sem, spec, split)
        for name in (inst, pan, pan + "_separated", pan + "_stuffonly", sem):
            MetadataCatalog.get(name).set(shapes_preset=preset)
    return spec


def register_presets(root: str | None = None, **kwargs) -> dict[str, ShapesSpec]:
    """Register every preset under its own names, ``shapes_<preset>_*`` (``kwargs`` as in
    ``register_shapes``: sizes and seed); returns preset -> spec."""
    return {
        name: register_shapes(root, prefix=f"shapes_{name}", preset=name, **kwargs)
        for name in gen.PRESETS
    }


def configure_shapes_from_cfg(cfg, generate: bool = False) -> ShapesSpec:
    """Re-register the ``shapes_*`` names with ``cfg.DATASETS.SHAPES`` (see ``add_common_config``).

    Args:
        cfg: a config that went through ``common.engine.defaults.add_common_config``.
        generate: also generate, now, the splits of ``shapes`` datasets named in
            ``cfg.DATASETS.TRAIN``/``TEST`` (otherwise on first use).
    """
    node = cfg.DATASETS.get("SHAPES")
    if node is None:
        raise KeyError(
            "cfg.DATASETS.SHAPES is missing: call common.engine.defaults.add_common_config(cfg)"
        )
    kwargs = dict(
        image_size=int(node.IMAGE_SIZE),
        num_train=int(node.NUM_TRAIN),
        num_val=int(node.NUM_VAL),
        seed=int(node.SEED),
        preset=str(node.PRESET),
    )
    spec = register_shapes(**kwargs)
    register_shapes(**{**kwargs, "prefix": f"shapes_{kwargs['preset']}"})
    if cfg.DATASETS.get("SHAPES_VIS") is not None:
        shapes_vis.configure_shapes_vis_from_cfg(cfg)
    if generate:
        for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
            ensure_generated(name)
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m common.data.shapes --image-size 128 --num-train 600 --num-val 100``."""
    parser = argparse.ArgumentParser(description="Pre-generate the synthetic shapes dataset.")
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS or ./datasets")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=gen.DEFAULT_PRESET, choices=sorted(gen.PRESETS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    root = args.root or datasets_root()
    spec = ShapesSpec(
        os.path.abspath(root), args.image_size, args.num_train, args.num_val, args.seed, args.preset
    )
    start = time.perf_counter()
    for split in SPLITS:
        ensure_split(spec, split)
    logger.info("shapes ready in %s (%.1f s)", spec.dataset_dir, time.perf_counter() - start)
    return 0


# Register the default-sized dataset on import, as detectron2's builtin.py does for COCO.
if __name__.endswith(".shapes"):
    register_shapes()
    register_presets()

if __name__ == "__main__":
    raise SystemExit(main())
