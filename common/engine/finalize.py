"""Config finalisation: the keys that are stated once and derived everywhere else.

``merge_config`` ends with :func:`finalize_config`, before any model is built. It resolves

- ``MODEL.TASK`` ("instance" | "panoptic" | "semantic"; "" = from the ``evaluator_type`` of
  ``DATASETS.TRAIN[0]``'s metadata, else of ``DATASETS.TEST[0]``, else "instance");
- ``MODEL.NUM_CLASSES`` (-1 = from that dataset's metadata, as the task counts classes:
  instance = thing classes, panoptic = thing + stuff classes, semantic = every class);
- from the task: ``INPUT.DATASET_MAPPER_NAME`` and ``TEST.EVAL_TASKS``;
- each project's own keys, through its ``finalize_<name>_config(cfg, fin)`` (aliases of the
  shared keys such as ``MODEL.QUERYINST.NUM_CLASSES``, and output flags).

A key is *explicit* when a YAML of the ``_BASE_`` chain or a command-line override sets it. A
derived key that is not explicit is overwritten with the derived value; an explicit one must
agree, or finalisation raises ``ValueError`` naming both keys. An explicit deprecated alias
supplies the shared key when that one is unset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

import common.data  # noqa: F401  (registers the shapes_* datasets, whose metadata it reads)
from common.engine.projects import load_projects
from common.modeling.meta_arch import metadata_class_count
from common.modeling.sem_seg_tta import sem_seg_tta_settings

__all__ = [
    "TASKS",
    "TASK_EVAL_TASKS",
    "ConfigFinalizer",
    "explicit_keys",
    "finalize_config",
]

logger = logging.getLogger(__name__)

TASKS = ("instance", "panoptic", "semantic")
#: ``TEST.EVAL_TASKS`` derived from each task.
TASK_EVAL_TASKS = {
    "instance": ("segm", "bbox"),
    "panoptic": ("panoptic_seg",),
    "semantic": ("sem_seg",),
}
#: Detectron2's ``evaluator_type`` of a dataset -> the task it is annotated for.
_EVALUATOR_TASK = {
    "coco": "instance",
    "lvis": "instance",
    "cityscapes_instance": "instance",
    "ytvis": "instance",  # video instances (YouTube-VIS)
    "coco_panoptic_seg": "panoptic",
    "cityscapes_panoptic_seg": "panoptic",
    "sem_seg": "semantic",
    "cityscapes_sem_seg": "semantic",
}
# Outputs each task's models cannot produce (an explicit TEST.EVAL_TASKS holding one is an
# error); the task's own output must be in it.
_FORBIDDEN_EVAL = {
    "instance": ("panoptic_seg", "sem_seg"),
    "panoptic": (),
    "semantic": ("segm", "bbox", "panoptic_seg"),
}
_REQUIRED_EVAL = {
    "instance": ("segm", "bbox"),
    "panoptic": ("panoptic_seg",),
    "semantic": ("sem_seg",),
}
# The three mappers that serve one task each; any other (e.g. "detectron2") serves every task.
_TASK_MAPPERS = set(TASKS)


def explicit_keys(loaded: dict[str, Any], opts: Iterable[str] = ()) -> set[str]:
    """Full keys (``"MODEL.NUM_CLASSES"``) set by a merged YAML dict and ``KEY VALUE`` opts."""
    keys: set[str] = set()

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            full = f"{prefix}{k}"
            keys.add(full)
            if isinstance(v, dict):
                walk(v, full + ".")

    walk(loaded, "")
    opts = list(opts)
    keys.update(str(k) for k in opts[0::2])
    return keys


def _get(cfg: CfgNode, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: CfgNode, key: str, value: Any) -> None:
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


class ConfigFinalizer:
    """Derives keys of ``cfg`` in place, honouring (and checking) explicit ones.

    Args:
        cfg: a merged, unfrozen config.
        explicit: full keys set by the YAML chain / overrides; ``None``: every shared key that
            is not at its "derive" value (``MODEL.TASK`` "", ``MODEL.NUM_CLASSES`` -1) counts as
            explicit, and nothing else does.
    """

    def __init__(self, cfg: CfgNode, explicit: set[str] | None = None):
        self.cfg = cfg
        if explicit is None:
            explicit = set()
            if cfg.MODEL.TASK:
                explicit.add("MODEL.TASK")
            if cfg.MODEL.NUM_CLASSES >= 0:
                explicit.add("MODEL.NUM_CLASSES")
        self.explicit = set(explicit)
        # where each derived shared value came from, for error messages
        self.sources: dict[str, str] = {}

    # ---- helpers for every derived key --------------------------------------------------
    def is_explicit(self, key: str) -> bool:
        return key in self.explicit

    def source(self, key: str) -> str:
        """``KEY='value'`` plus where the value came from, for messages."""
        how = self.sources.get(key)
        return f"{key}={_get(self.cfg, key)!r}" + (f" ({how})" if how else "")

    def derive(
        self,
        key: str,
        value: Any,
        from_key: str,
        agrees: Callable[[Any], bool] | None = None,
    ) -> None:
        """Set ``key`` to ``value`` (derived from ``from_key``) unless ``key`` is explicit; an
        explicit value must satisfy ``agrees`` (default: equal), else ``ValueError`` naming both
        keys."""
        if not self.is_explicit(key):
            _set(self.cfg, key, value)
            self.sources[key] = f"derived from {from_key}"
            return
        given = _get(self.cfg, key)
        ok = agrees(given) if agrees is not None else given == value
        if not ok:
            raise ValueError(
                f"{key}={given!r} contradicts {self.source(from_key)}; remove {key} from the "
                f"config (it is derived from {from_key}) or make the two agree"
            )

    def alias(self, alias_key: str, shared_key: str) -> None:
        """``alias_key`` is a deprecated alias of ``shared_key``: an explicit alias supplies an
        unset shared key (or must agree with a set one); otherwise it receives its value."""
        shared = _get(self.cfg, shared_key)
        unset = shared in ("", -1, None)
        if self.is_explicit(alias_key):
            given = _get(self.cfg, alias_key)
            logger.warning("%s is deprecated: set %s instead", alias_key, shared_key)
            if unset:
                _set(self.cfg, shared_key, given)
                self.sources[shared_key] = f"from the deprecated {alias_key}"
                return
            if given != shared:
                raise ValueError(
                    f"{alias_key}={given!r} (deprecated alias) contradicts "
                    f"{self.source(shared_key)}; set only {shared_key}"
                )
            return
        if not unset:
            _set(self.cfg, alias_key, shared)

    # ---- the task -----------------------------------------------------------------------
    def _dataset(self) -> str | None:
        names = [*self.cfg.DATASETS.TRAIN[:1], *self.cfg.DATASETS.TEST[:1]]
        return names[0] if names else None

    def resolve_task(self) -> None:
        """``MODEL.TASK``: explicit, else from the dataset's ``evaluator_type``; left "" when
        neither says (a project alias may still set it, :meth:`finish` falls back to
        "instance")."""
        cfg = self.cfg
        if self.is_explicit("MODEL.TASK") and cfg.MODEL.TASK:
            if cfg.MODEL.TASK not in TASKS:
                raise ValueError(f"MODEL.TASK={cfg.MODEL.TASK!r}: expected one of {TASKS} or ''")
            self.sources["MODEL.TASK"] = "set in the config"
            return
        cfg.MODEL.TASK = ""
        name = self._dataset()
        if name is None:
            return
        evaluator = getattr(MetadataCatalog.get(name), "evaluator_type", None)
        task = _EVALUATOR_TASK.get(evaluator)
        if task is not None:
            cfg.MODEL.TASK = task
            self.sources["MODEL.TASK"] = f"derived from dataset {name!r}"

    @property
    def task(self) -> str:
        """The resolved task ("instance" when nothing states one)."""
        if not self.cfg.MODEL.TASK:
            self.cfg.MODEL.TASK = "instance"
            self.sources["MODEL.TASK"] = "the default: no dataset evaluator_type states one"
        return self.cfg.MODEL.TASK

    # ---- the class count ----------------------------------------------------------------
    def metadata_counts(self) -> tuple[str, int, int] | None:
        """(dataset name, thing count, total count) of ``DATASETS.TRAIN[0]``; None when there is
        no training set. Totals count ``stuff_classes`` (every class in the standard panoptic
        and semantic registrations); 0 means the metadata does not list them."""
        if not self.cfg.DATASETS.TRAIN:
            return None
        name = self.cfg.DATASETS.TRAIN[0]
        meta = MetadataCatalog.get(name)
        return (
            name,
            metadata_class_count(meta, "thing_classes"),
            metadata_class_count(meta, "stuff_classes"),
        )

    def dataset_num_classes(self) -> tuple[str, int, str] | None:
        """(dataset, count, field) the task counts in the training set's metadata, or None."""
        counts = self.metadata_counts()
        if counts is None:
            return None
        name, things, total = counts
        if (self.cfg.MODEL.TASK or "instance") == "instance":
            return (name, things, "thing_classes") if things else None
        return (name, total, "stuff_classes") if total else None

    def resolve_num_classes(self) -> None:
        """``MODEL.NUM_CLASSES``: explicit (checked against the metadata), else from it; -1
        when neither (a project alias may supply it)."""
        cfg = self.cfg
        from_data = self.dataset_num_classes()
        if self.is_explicit("MODEL.NUM_CLASSES") and cfg.MODEL.NUM_CLASSES >= 0:
            self.sources["MODEL.NUM_CLASSES"] = "set in the config"
            self.check_against_dataset("MODEL.NUM_CLASSES", cfg.MODEL.NUM_CLASSES)
            return
        cfg.MODEL.NUM_CLASSES = -1
        if from_data is not None:
            name, count, field = from_data
            cfg.MODEL.NUM_CLASSES = count
            self.sources["MODEL.NUM_CLASSES"] = f"the {field} of dataset {name!r}"

    def check_against_dataset(self, key: str, value: int) -> None:
        """``ValueError`` when ``key``'s class count disagrees with the training set's."""
        from_data = self.dataset_num_classes()
        if from_data is not None and from_data[1] != value:
            name, count, field = from_data
            raise ValueError(f"{key}={value} but dataset {name!r} has {count} {field}")

    def num_classes_alias(self, alias_key: str) -> None:
        """:meth:`alias` for a class count, checking an explicit alias against the dataset
        first (so the message names the alias the config set)."""
        if self.is_explicit(alias_key) and not self.is_explicit("MODEL.NUM_CLASSES"):
            self.check_against_dataset(alias_key, _get(self.cfg, alias_key))
        self.alias(alias_key, "MODEL.NUM_CLASSES")

    # ---- what follows from the task -----------------------------------------------------
    def finish(self) -> None:
        """Derive ``INPUT.DATASET_MAPPER_NAME`` and ``TEST.EVAL_TASKS`` from the task (and, for
        a video dataset, ``evaluator_type`` "ytvis", the ``video_instance`` mapper)."""
        task = self.task
        name = self._dataset()
        video = name is not None and (
            getattr(MetadataCatalog.get(name), "evaluator_type", None) == "ytvis"
        )
        self.derive(
            "INPUT.DATASET_MAPPER_NAME",
            "video_instance" if video else task,
            f"the video dataset {name!r}" if video else "MODEL.TASK",
            agrees=lambda name: name == task or name not in _TASK_MAPPERS,
        )

        def eval_agrees(tasks: Any) -> bool:
            tasks = tuple(tasks)
            return any(t in tasks for t in _REQUIRED_EVAL[task]) and not any(
                t in tasks for t in _FORBIDDEN_EVAL[task]
            )

        self.derive("TEST.EVAL_TASKS", TASK_EVAL_TASKS[task], "MODEL.TASK", agrees=eval_agrees)


def finalize_config(cfg: CfgNode, explicit: set[str] | None = None) -> CfgNode:
    """Resolve the derived keys of ``cfg`` in place (see the module docstring) and return it.

    Args:
        cfg: a merged, unfrozen config with the common keys (``get_cfg``).
        explicit: keys set by the config files / overrides (``merge_config`` passes them); see
            :class:`ConfigFinalizer`.
    """
    fin = ConfigFinalizer(cfg, explicit)
    fin.resolve_task()
    fin.resolve_num_classes()
    for project in load_projects():
        if project.finalize is not None:
            project.finalize(cfg, fin)
    fin.finish()
    sem_seg_tta_settings(cfg)  # TEST.SEM_SEG_TTA: checked (and read) at start-up, not at eval
    return cfg
