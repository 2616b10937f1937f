"""Fixtures shared by every test.

``shapes_tiny`` (session scope)
    A tiny built-in ``shapes`` dataset (64 px, 8 train + 8 val images, seed 0), generated once per
    test session into a temporary DETECTRON2_DATASETS-style root and registered under the prefix
    ``shapes_tiny`` (so the default ``shapes_*`` names stay untouched). Image index 7 of each split
    has no things (the empty-image path). Attributes:

    - ``root``: the datasets root (holds ``shapes/<tag>/``); ``dataset_dir``: the folder itself;
      ``spec``: its ``common.data.shapes.ShapesSpec``; ``params``: image_size/num_train/...
    - registered names: ``train``, ``val`` (COCO instances), ``train_panoptic``,
      ``val_panoptic`` (standard panoptic + semantic labels), ``train_panoptic_separated``,
      ``val_panoptic_separated`` (Panoptic FPN), ``sem_seg_train``, ``sem_seg_val`` (ADE20K style).
    - ``preset``: "standard" (the default); ``shapes_tiny_hard`` is the same under "hard".
    - ``cfg_opts``: ``["DATASETS.SHAPES.PRESET", "standard", "DATASETS.SHAPES.IMAGE_SIZE", ...]``
      overrides that make
      ``configure_shapes_from_cfg`` (train_net.py) resolve to this very folder when
      DETECTRON2_DATASETS points at ``root`` (see ``shapes_tiny_env``).

``shapes_tiny_env`` (function scope)
    ``shapes_tiny`` with DETECTRON2_DATASETS set to its root for the test, so that in-process code
    using the default names (``shapes_train``, ``shapes_val_panoptic``, ...) plus
    ``shapes_tiny.cfg_opts`` reads the tiny folder without generating anything. Afterwards the
    default ``shapes_*`` names are registered again as ``import common.data`` leaves them. For a
    subprocess (train_net.py), pass ``DETECTRON2_DATASETS=shapes_tiny.root`` in its environment.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """The start-up call every QuerySeg program makes (``train_net.py``, the demo, the tools):
    patch Detectron2 and load the projects (``common.engine.launch.setup_queryseg``)."""
    from common.engine.launch import setup_queryseg

    setup_queryseg()


TINY_SHAPES = {"image_size": 64, "num_train": 8, "num_val": 8, "seed": 0}


def _tiny_shapes(root: str, prefix: str, preset: str) -> SimpleNamespace:
    from common.data.shapes import SPLITS, ensure_split, register_shapes

    spec = register_shapes(root=root, prefix=prefix, preset=preset, **TINY_SHAPES)
    for split in SPLITS:
        ensure_split(spec, split)
    names = {}
    for split in SPLITS:
        names[split] = f"{prefix}_{split}"
        names[f"{split}_panoptic"] = f"{prefix}_{split}_panoptic"
        names[f"{split}_panoptic_separated"] = f"{prefix}_{split}_panoptic_separated"
        names[f"sem_seg_{split}"] = f"{prefix}_sem_seg_{split}"
    opts = ["DATASETS.SHAPES.PRESET", preset]
    for key, value in TINY_SHAPES.items():
        opts += [f"DATASETS.SHAPES.{key.upper()}", str(value)]
    return SimpleNamespace(
        root=root,
        dataset_dir=spec.dataset_dir,
        spec=spec,
        prefix=prefix,
        preset=preset,
        params=dict(TINY_SHAPES),
        cfg_opts=opts,
        **names,
    )


@pytest.fixture(scope="session")
def shapes_tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return _tiny_shapes(str(tmp_path_factory.mktemp("datasets")), "shapes_tiny", "standard")


@pytest.fixture(scope="session")
def shapes_tiny_hard(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``shapes_tiny`` under the ``hard`` preset (names ``shapes_tinyhard_*``)."""
    return _tiny_shapes(str(tmp_path_factory.mktemp("datasets")), "shapes_tinyhard", "hard")


@pytest.fixture
def shapes_tiny_env(shapes_tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch):
    from common.data.shapes import register_presets, register_shapes

    default_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    monkeypatch.setenv("DETECTRON2_DATASETS", shapes_tiny.root)
    yield shapes_tiny
    register_shapes(root=default_root)
    register_presets(root=default_root)
