"""No silent no-ops: a config key the user set must be used by what is built.

Detectron2 accepts any key that exists in the defaults, whether or not the model being built reads
it, so ``MODEL.FASTINST.NUM_OBJECT_QUERIES 7`` on a K-Net config trains K-Net unchanged. This
module turns that into an error, before training or evaluation starts:

- :func:`track_reads` (called by ``merge_config``) turns the merged config into a tree of
  :class:`TrackedCfgNode`, which records every key that code reads (attribute or item access,
  ``get``, iterating ``items()``/``values()``); dumping, printing, cloning, freezing and merging
  record nothing.
- :func:`check_config_use` compares the keys the YAML chain or the command line set (leaves
  only) with what was read while the config was finalised and the model, data pipeline and
  trainer were built, and raises :class:`UnusedConfigKeysError` naming

  * *foreign* keys: under a config node that another project's ``add_<name>_config`` creates
    (``MODEL.FASTINST`` in a K-Net run; the namespaces come from the project entry points,
    :mod:`common.engine.projects`, by diffing the config before and after each
    ``add_<name>_config``), and
  * *unread* keys: nothing read them.

- The opt-out: ``QUERYSEG.ALLOW_UNUSED_KEYS True`` (``train_net.py --allow-unused-keys``) logs
  the same list as a warning instead.

A new key needs no declaration: it counts as used when the code that builds the model, the data
pipeline, the optimizer or the trainer's hooks reads it from the config. A key read only later
(in ``forward``, at test time) must also be read at build time (e.g. in ``from_config``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from detectron2.config import CfgNode

__all__ = [
    "ALLOW_KEY",
    "ReadTracker",
    "TrackedCfgNode",
    "UnusedConfigKeysError",
    "check_config_use",
    "find_unused_keys",
    "project_namespaces",
    "track_reads",
]

logger = logging.getLogger(__name__)

#: The opt-out key: True turns the error into a warning.
ALLOW_KEY = "QUERYSEG.ALLOW_UNUSED_KEYS"
# set by the machinery, never a "use" question
_ALWAYS_USED = {"VERSION", ALLOW_KEY}


class ReadTracker:
    """The keys read from one config tree (shared by its clones), the keys the user set and
    where each was set (file or "command line")."""

    def __init__(self, explicit: Iterable[str] = (), origins: dict[str, str] | None = None):
        self.reads: set[str] = set()
        self.explicit: set[str] = set(explicit)
        self.origins: dict[str, str] = dict(origins or {})
        # the files given to merge_config (not their _BASE_ files), plus the overrides
        self.user_sources: set[str] = {"the command line", "a later override"}
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def note(self, key: str) -> None:
        if not self._paused:
            self.reads.add(key)


def _tracker_of(node: Any) -> ReadTracker | None:
    return node.__dict__.get("_qs_tracker") if isinstance(node, CfgNode) else None


class TrackedCfgNode(CfgNode):
    """A :class:`CfgNode` that records the full names of the keys read from it."""

    def _qs_note(self, key: Any) -> None:
        tracker = self.__dict__.get("_qs_tracker")
        if tracker is not None and isinstance(key, str):
            tracker.note(self.__dict__.get("_qs_path", "") + key)

    @contextlib.contextmanager
    def _qs_paused(self) -> Iterator[None]:
        tracker = self.__dict__.get("_qs_tracker")
        if tracker is None:
            yield
            return
        with tracker.paused():
            yield

    def __getattr__(self, name: str) -> Any:
        if name in self:
            self._qs_note(name)
            return dict.__getitem__(self, name)
        raise AttributeError(name)

    def __getitem__(self, key: Any) -> Any:
        self._qs_note(key)
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._qs_note(key)
        return dict.get(self, key, default)

    def items(self):  # type: ignore[override]
        for k in dict.keys(self):
            self._qs_note(k)
        return dict.items(self)

    def values(self):  # type: ignore[override]
        for k in dict.keys(self):
            self._qs_note(k)
        return dict.values(self)

    # ---- what records nothing: printing, dumping, copying, freezing, merging ----------------
    def dump(self, **kwargs: Any) -> str:
        with self._qs_paused():
            return super().dump(**kwargs)

    def __str__(self) -> str:
        with self._qs_paused():
            return super().__str__()

    def __repr__(self) -> str:
        with self._qs_paused():
            return super().__repr__()

    def _immutable(self, is_immutable: bool) -> None:
        with self._qs_paused():
            super()._immutable(is_immutable)

    def __deepcopy__(self, memo: dict) -> TrackedCfgNode:
        """A tracked copy that records into the same tracker (``cfg.clone()`` in Detectron2's
        hooks and loaders reads on behalf of the run)."""
        tracker = self.__dict__.get("_qs_tracker")
        with self._qs_paused():
            plain = CfgNode()
            for k, v in dict.items(self):
                dict.__setitem__(plain, k, copy.deepcopy(v, memo))
            plain.__dict__.update(
                {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_qs_tracker"}
            )
        _convert(plain, self.__dict__.get("_qs_path", ""), tracker)
        return plain  # type: ignore[return-value]

    def merge_from_list(self, cfg_list: list) -> None:
        tracker = self.__dict__.get("_qs_tracker")
        with self._qs_paused():
            super().merge_from_list(cfg_list)
        if tracker is not None:
            prefix = self.__dict__.get("_qs_path", "")
            for key in cfg_list[0::2]:
                tracker.explicit.add(prefix + str(key))
                tracker.origins.setdefault(prefix + str(key), "a later override")

    def merge_from_other_cfg(self, cfg_other: CfgNode) -> None:
        with self._qs_paused():
            super().merge_from_other_cfg(cfg_other)

    def merge_from_file(self, *args: Any, **kwargs: Any) -> None:
        with self._qs_paused():
            super().merge_from_file(*args, **kwargs)


def _convert(node: CfgNode, prefix: str, tracker: ReadTracker | None) -> None:
    object.__setattr__(node, "__class__", TrackedCfgNode)
    node.__dict__["_qs_path"] = prefix
    node.__dict__["_qs_tracker"] = tracker
    for k, v in dict.items(node):
        if isinstance(v, CfgNode):
            _convert(v, f"{prefix}{k}.", tracker)


def track_reads(
    cfg: CfgNode,
    explicit: Iterable[str] = (),
    origins: dict[str, str] | None = None,
    leaf: str | None = None,
) -> ReadTracker:
    """Make ``cfg`` (in place) record the keys read from it from now on; ``explicit`` are the
    keys the user set, ``origins`` where each was set, ``leaf`` the config file given (its
    ``_BASE_`` files are not "the user's", see :func:`find_unused_keys`). A config tracked
    already keeps its tracker, which gains ``explicit`` and ``origins`` (``merge_config``
    called twice). Returns the tracker."""
    tracker = _tracker_of(cfg)
    if tracker is not None:
        tracker.explicit.update(explicit)
        tracker.origins.update(origins or {})
    else:
        tracker = ReadTracker(explicit, origins)
    if leaf:
        tracker.user_sources.add(leaf)
    _convert(cfg, "", tracker)
    return tracker


# ---- namespaces ---------------------------------------------------------------------------
_NAMESPACES: dict[str, str] | None = None


def _nodes(cfg: CfgNode, prefix: str = "") -> set[str]:
    out = set()
    for k, v in dict.items(cfg):
        if isinstance(v, CfgNode):
            out.add(prefix + k)
            out |= _nodes(v, f"{prefix}{k}.")
    return out


def project_namespaces() -> dict[str, str]:
    """``{config node: project}`` for every config node an installed project's
    ``add_<name>_config`` creates (``MODEL.<NAME>`` -> its project); only new nodes count,
    not keys a project adds to a shared node."""
    global _NAMESPACES
    if _NAMESPACES is None:
        from detectron2.config import get_cfg as _d2_get_cfg

        from common.engine.defaults import add_common_config
        from common.engine.projects import load_projects

        out: dict[str, str] = {}
        for project in load_projects():
            cfg = _d2_get_cfg()
            add_common_config(cfg)
            before = _nodes(cfg)
            project.add_config(cfg)
            new = _nodes(cfg) - before
            for node in new:
                if node.rpartition(".")[0] not in new:  # the outermost new node
                    out[node] = project.name
        _NAMESPACES = out
    return _NAMESPACES


def _arch_project(arch: str) -> str | None:
    """The project whose package registers meta-architecture ``arch`` (None: Detectron2's or
    unknown)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from common.engine.projects import load_projects

    try:
        module = META_ARCH_REGISTRY.get(arch).__module__
    except KeyError:
        return None
    for project in load_projects():
        root = project.module.__name__
        if module == root or module.startswith(root + "."):
            return project.name
    return None


def _leaf_exists(cfg: CfgNode, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = dict.__getitem__(node, part)
    return not isinstance(node, CfgNode)


def _value(cfg: CfgNode, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = dict.__getitem__(node, part)
    return node


class UnusedConfigKeysError(ValueError):
    """Config keys were set that the built run does not use."""


_DEFAULTS: dict[str, Any] | None = None


def _default_values() -> dict[str, Any]:
    """``{full key: default value}`` of every leaf of ``get_cfg()``."""
    global _DEFAULTS
    if _DEFAULTS is None:  # get_cfg()'s keys, built here (common.engine.config imports us)
        from detectron2.config import get_cfg as _d2_get_cfg

        from common.engine.defaults import add_common_config
        from common.engine.projects import load_projects

        cfg = _d2_get_cfg()
        add_common_config(cfg)
        for project in load_projects():
            project.add_config(cfg)
        out: dict[str, Any] = {}

        def walk(node: CfgNode, prefix: str) -> None:
            for k, v in dict.items(node):
                if isinstance(v, CfgNode):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[prefix + k] = v

        walk(cfg, "")
        _DEFAULTS = out
    return _DEFAULTS


def _norm(v: Any) -> Any:
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def find_unused_keys(cfg: CfgNode) -> list[tuple[str, str]]:
    """``[(key, why)]`` for the keys (leaves) set by the config chain or the overrides that are

    - *foreign*: under a config node another project creates (any file of the chain), or
    - *unread*: set by the config file given or an override (a key only a ``_BASE_`` file sets
      may serve other leaves of that base, e.g. ResNet keys under a Swin leaf), to a value that
      differs from the default, and read by nothing.

    ``cfg`` must come from ``merge_config`` (it tracks reads)."""
    tracker = _tracker_of(cfg)
    if tracker is None:
        raise TypeError("check_config_use needs a config from merge_config (it tracks reads)")
    arch = dict.__getitem__(dict.__getitem__(cfg, "MODEL"), "META_ARCHITECTURE")
    owner = _arch_project(arch)
    namespaces = project_namespaces()
    defaults = _default_values()
    out = []
    for key in sorted(tracker.explicit):
        if key in _ALWAYS_USED or not _leaf_exists(cfg, key):
            continue
        foreign = next(
            (
                (ns, proj)
                for ns, proj in namespaces.items()
                if (key == ns or key.startswith(ns + ".")) and proj != owner
            ),
            None,
        )
        if foreign is not None:
            ns, proj = foreign
            out.append((key, f"{ns} belongs to project {proj!r}, not to {arch}"))
        elif (
            key not in tracker.reads
            and tracker.origins.get(key, "the command line") in tracker.user_sources
            and _norm(_value(cfg, key)) != _norm(defaults.get(key, object()))
        ):
            out.append(
                (key, f"nothing in the built {arch} model, data pipeline or trainer reads it")
            )
    return out


def check_config_use(cfg: CfgNode) -> list[tuple[str, str]]:
    """Raise :class:`UnusedConfigKeysError` naming the unused keys (see the module docstring),
    or, with ``QUERYSEG.ALLOW_UNUSED_KEYS True``, log them as a warning. Returns them."""
    unused = find_unused_keys(cfg)
    if not unused:
        return unused
    tracker = _tracker_of(cfg)
    arch = _value(cfg, "MODEL.META_ARCHITECTURE")
    lines = [
        f"  {key}={_value(cfg, key)!r} (set in {tracker.origins.get(key, 'the config')}): {why}"
        for key, why in unused
    ]
    allow = bool(_value(cfg, ALLOW_KEY)) if _leaf_exists(cfg, ALLOW_KEY) else False
    head = f"{len(unused)} config key(s) set but not used by meta-architecture {arch}:\n"
    if allow:
        logger.warning(head + "\n".join(lines) + f"\n({ALLOW_KEY} is True: going on)")
        return unused
    raise UnusedConfigKeysError(
        head
        + "\n".join(lines)
        + f"\nRemove them, or set {ALLOW_KEY} True (train_net.py --allow-unused-keys) to "
        "accept keys that do nothing."
    )
