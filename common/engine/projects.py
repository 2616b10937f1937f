"""Project discovery: common/ names no project; projects declare themselves.

A project package declares itself in ``setup.cfg`` under the entry-point group
``queryseg.projects`` (``knet = knet``): the name is the project, the value its package. Importing
the package registers its meta-architecture, heads and loss/cost terms into Detectron2's and
common's registries, and the package exposes ``add_<name>_config(cfg)``, which writes only
``MODEL.<NAME>.*``, and optionally ``finalize_<name>_config(cfg, fin)``, which
``common.engine.finalize`` calls once the shared keys are resolved, to derive (and check) the
keys of its own meta-architectures: aliases of ``MODEL.TASK`` / ``MODEL.NUM_CLASSES``, output
flags. A fifth method is added with its own package and one entry-point line; nothing
in common/ changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from detectron2.config import CfgNode

ENTRY_POINT_GROUP = "queryseg.projects"


@dataclass(frozen=True)
class Project:
    """An installed project: its name, its imported package, its ``add_<name>_config`` and its
    ``finalize_<name>_config`` (None when it has none)."""

    name: str
    module: ModuleType
    add_config: Callable[[CfgNode], None]
    finalize: Callable[[CfgNode, Any], None] | None = None


_LOADED: dict[str, Project] = {}


def load_projects() -> list[Project]:
    """Import every project declared under ``queryseg.projects`` (sorted by name) and return
    them. Raises ``AttributeError`` when a package lacks ``add_<name>_config``."""
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in _LOADED:
            continue
        module = importlib.import_module(ep.value)
        add_fn = getattr(module, f"add_{ep.name}_config", None)
        if add_fn is None:
            raise AttributeError(
                f"project {ep.name!r} ({ep.value}) declares no add_{ep.name}_config(cfg)"
            )
        finalize = getattr(module, f"finalize_{ep.name}_config", None)
        _LOADED[ep.name] = Project(ep.name, module, add_fn, finalize)
    return [_LOADED[k] for k in sorted(_LOADED)]
