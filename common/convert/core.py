"""Checkpoint-conversion core: safe loading and the machinery every converter shares.

- :func:`load_checkpoint_file` opens a ``.pth``/``.pkl`` without running arbitrary pickled code:
  ``torch.load(weights_only=True)`` (NumPy arrays allowed), and a restricted unpickler for
  Detectron2/Caffe2 ``.pkl`` files. A file that needs more is refused, naming the file and the
  object, unless the caller says it is trusted.
- :func:`extract_model_state` finds the weights in the common layouts (mmcv ``state_dict``,
  Detectron2/maskrcnn-benchmark ``model``, a bare state dict) and strips DDP's ``module.``.
- :class:`Rule` / :func:`convert_state_dict` / :func:`check_against_model` / :func:`save_converted`
  are the converter core (``tools/convert_*.py``): every source key must match a rule (or be dropped
  on purpose), every target key must be produced with the model's shape, and nothing is written
  while any of that fails: the error lists every offending key.

The converters' command line is :mod:`common.convert.cli`; strict loading for training and
``--eval-only`` is :class:`common.engine.checkpoint.QSCheckpointer`.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or converted as asked; the message names the file."""


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


def _numpy_safe_globals() -> list[Any]:
    out: list[Any] = [np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("f4", "f8", "f2", "i8", "i4", "i2", "i1", "u1", "b1")]
    core = getattr(np, "_core", None) or np.core
    out += [core.multiarray._reconstruct, core.multiarray.scalar]
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and NumPy arrays, nothing else."""

    def __init__(self, f, path: str):
        super().__init__(f, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS or (
            module.startswith("numpy") and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self._path}: refusing to unpickle {module}.{name} (only arrays and containers are "
            "loaded from untrusted .pkl files); pass trusted=True / --trust if you trust the file"
        )


def load_checkpoint_file(path: str, trusted: bool = False) -> Any:
    """Load a checkpoint file without executing arbitrary pickled code unless ``trusted``.

    ``.pkl`` files (Detectron2 model zoo, Caffe2/Detectron1 ImageNet weights) go through a
    restricted unpickler; everything else through ``torch.load(weights_only=True)`` with NumPy
    arrays allowed. Raises :class:`CheckpointError` naming ``path`` on a missing, truncated or
    unsafe file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                if trusted:
                    return pickle.load(f, encoding="latin1")
                return _RestrictedUnpickler(f, path).load()
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: not loadable with weights_only=True ({str(e).splitlines()[0]}). It holds "
            "objects other than tensors/arrays/containers; if you trust the file, pass "
            "trusted=True / --trust (MODEL.WEIGHTS_TRUSTED True for train_net.py)"
        ) from e
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    except Exception as e:  # arbitrary bytes make the unpickler raise KeyError, IndexError, ...
        raise CheckpointError(
            f"{path}: not a PyTorch/Detectron2 checkpoint (unpickling failed with "
            f"{type(e).__name__}: {e})"
        ) from e


def extract_model_state(obj: Any, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Return the model weights of a loaded checkpoint as ``{name: tensor}``.

    Accepts mmcv (``{"state_dict": ..., "meta": ...}``), Detectron2 / maskrcnn-benchmark
    (``{"model": ...}``), pycls (``model_state``) and bare state dicts; strips ``module.``.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    for key in ("state_dict", "model", "model_state"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    bad = []
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            bad.append(k)
            continue
        out[k.removeprefix("module.")] = v
    if bad:
        raise CheckpointError(
            f"{path}: not a model state dict; non-tensor entries: {', '.join(bad[:10])}"
            + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        )
    if not out:
        raise CheckpointError(f"{path}: the checkpoint holds no weights")
    return out


# --------------------------------------------------------------------------------------------
# Conversion core
# --------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]


@dataclass(frozen=True)
class Rule:
    """One source-key rule. ``pattern`` must match the whole source key (``re.fullmatch``).

    ``target``: a replacement template (``\\1`` groups allowed), a sequence of templates when one
    tensor is split into several (``transform`` then returns one tensor per target), or ``None``
    to drop the key on purpose (solver state, ``num_batches_tracked``, an ImageNet classifier).
    """

    pattern: str
    target: str | Sequence[str] | None
    transform: Transform | None = None

    def __post_init__(self):
        object.__setattr__(self, "_re", re.compile(self.pattern))


@dataclass
class ConversionReport:
    """What a conversion could not do; :attr:`ok` when there is nothing to report."""

    unmapped: list[str] = field(default_factory=list)  # source keys no rule matched
    duplicates: list[str] = field(default_factory=list)  # target keys produced twice
    missing: list[str] = field(default_factory=list)  # model keys the conversion did not produce
    unexpected: list[str] = field(default_factory=list)  # produced keys the model does not have
    shapes: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, ours, model)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.duplicates or self.missing or self.unexpected
                    or self.shapes)  # fmt: skip

    def format(self, limit: int = 40) -> str:
        lines = []

        def block(title: str, items: list) -> None:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {x}" for x in items[:limit])
                if len(items) > limit:
                    lines.append(f"  ... {len(items) - limit} more")

        block("source keys no rule maps", self.unmapped)
        block("target keys produced twice", self.duplicates)
        block("model keys the checkpoint does not provide", self.missing)
        block("converted keys the model does not have", self.unexpected)
        block("shape mismatches (key, converted, model)",
              [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.shapes])  # fmt: skip
        return "\n".join(lines)


def convert_state_dict(
    src: Mapping[str, torch.Tensor], rules: Sequence[Rule]
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Apply ``rules`` (first full match wins) to every source key.

    Returns the converted dict and a report listing unmapped source keys and target keys that two
    source keys produced. Nothing is silently dropped: a key leaves only through a ``None`` rule.
    """
    out: dict[str, torch.Tensor] = {}
    report = ConversionReport()
    for key, value in src.items():
        for rule in rules:
            m = rule._re.fullmatch(key)
            if m is None:
                continue
            if rule.target is None:
                break
            targets = [rule.target] if isinstance(rule.target, str) else list(rule.target)
            values = rule.transform(value) if rule.transform is not None else value
            if isinstance(values, torch.Tensor):
                values = [values]
            if len(values) != len(targets):
                raise CheckpointError(
                    f"rule {rule.pattern!r} produced {len(values)} tensors for {len(targets)} "
                    f"targets on {key!r}"
                )
            for tmpl, v in zip(targets, values):
                new = m.expand(tmpl)
                if new in out:
                    report.duplicates.append(new)
                out[new] = v.contiguous()
            break
        else:
            report.unmapped.append(key)
    return out, report


def check_against_model(
    state: Mapping[str, torch.Tensor],
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
    report: ConversionReport | None = None,
) -> ConversionReport:
    """Compare converted weights with a model's ``state_dict()``: missing, unexpected, shapes."""
    report = report or ConversionReport()
    target = (
        model_or_state.state_dict()
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    report.missing += sorted(k for k in target if k not in state)
    report.unexpected += sorted(k for k in state if k not in target)
    report.shapes += [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in state.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    return report


def save_converted(
    state: Mapping[str, torch.Tensor],
    report: ConversionReport,
    dst: str,
    source: str,
    meta_architecture: str | None = None,
) -> None:
    """Write ``{"model": state, ...}`` for ``MODEL.WEIGHTS``, or raise listing every problem.

    Nothing is written when ``report`` is not ok.
    """
    if not report.ok:
        raise CheckpointError(f"not writing {dst}: the conversion of {source} is incomplete\n"
                              + report.format())  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    payload = {
        "model": dict(state),
        "__author__": f"QuerySeg converter ({os.path.basename(source)})",
        "matching_heuristics": False,
    }
    if meta_architecture:
        payload["meta_architecture"] = meta_architecture
    tmp = dst + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, dst)


def class_permutation(src_names: Sequence[str], dst_names: Sequence[str], what: str) -> list[int]:
    """Indices ``p`` such that ``src_tensor[p]`` is in ``dst_names`` order (matched by name)."""
    index = {n: i for i, n in enumerate(src_names)}
    missing = [n for n in dst_names if n not in index]
    if missing or len(src_names) != len(dst_names):
        raise CheckpointError(
            f"{what}: class lists differ; target classes absent from the source: {missing}; "
            f"{len(src_names)} source vs {len(dst_names)} target classes"
        )
    return [index[n] for n in dst_names]


def permute_rows(perm: Sequence[int], extra: int = 0) -> Transform:
    """Transform reordering the first ``len(perm)`` rows (classes) and keeping ``extra`` trailing
    rows (a background / no-object row) in place."""
    idx = torch.as_tensor([*perm, *range(len(perm), len(perm) + extra)])

    def apply(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != len(idx):
            raise CheckpointError(f"expected {len(idx)} class rows, found shape {tuple(t.shape)}")
        return t[idx]

    return apply


def class_row_sources(
    src_names: Sequence[str],
    dst_names: Sequence[str],
    what: str,
    sources: Mapping[str, str | None] | None = None,
) -> list[int | None]:
    """For each target class, the index of the source class row it starts from, by name.

    A target class takes the source row of the same name, or of ``sources[target]`` when given
    (e.g. ``{"rider": "person"}``); ``sources[target] = None`` (or a target name the source lacks,
    with no entry in ``sources``) means no source row: ``None``, to be filled with the target
    model's own initial row (:func:`remap_class_rows`). Unlike :func:`class_permutation` the two
    lists may differ in length and source classes may go unused (COCO's 80 -> Cityscapes' 8).

    Raises:
        CheckpointError: a ``sources`` entry names a class absent from the source or the target,
            or a target class appears twice.
    """
    index = {n: i for i, n in enumerate(src_names)}
    sources = dict(sources or {})
    bad_src = {d: s for d, s in sources.items() if s is not None and s not in index}
    bad_dst = [d for d in sources if d not in dst_names]
    dup = sorted({n for n in dst_names if list(dst_names).count(n) > 1})
    if bad_src or bad_dst or dup:
        raise CheckpointError(
            f"{what}: cannot map class rows: sources absent from the checkpoint's classes "
            f"{bad_src}; targets absent from the model's classes {bad_dst}; repeated targets {dup}"
        )
    out: list[int | None] = []
    for name in dst_names:
        src = sources[name] if name in sources else name
        out.append(index.get(src) if src is not None else None)
    return out


def remap_class_rows(
    state: Mapping[str, torch.Tensor],
    pattern: str,
    rows: Sequence[int | None],
    initial: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Select class rows (dim 0) of every key of ``state`` that fully matches ``pattern``.

    Row ``i`` of the result is the source row ``rows[i]``, or, where ``rows[i]`` is ``None``,
    row ``i`` of ``initial[key]`` (the target model's own initialisation, e.g. a class the source
    never learned). Other keys are returned unchanged.

    Raises:
        CheckpointError: a row index beyond the source tensor, no pattern match at all, or a
            ``None`` row without ``initial`` / with an ``initial`` of the wrong shape.
    """
    regex = re.compile(pattern)
    out = dict(state)
    matched = [k for k in state if regex.fullmatch(k)]
    if not matched:
        raise CheckpointError(f"no class-row key matches {pattern!r}")
    fresh = [i for i, r in enumerate(rows) if r is None]
    for key in matched:
        t = state[key]
        if any(r is not None and r >= t.shape[0] for r in rows):
            raise CheckpointError(
                f"{key}: class row index {max(r for r in rows if r is not None)} is beyond its "
                f"{t.shape[0]} rows"
            )
        picked = t[[r if r is not None else 0 for r in rows]].clone()
        if fresh:
            init = initial.get(key) if initial is not None else None
            if init is None or tuple(init.shape) != tuple(picked.shape):
                raise CheckpointError(
                    f"{key}: target class rows {fresh} have no source row and need the model's "
                    "initial values (build the model from the target config), found "
                    f"{None if init is None else tuple(init.shape)} for {tuple(picked.shape)}"
                )
            picked[fresh] = init[fresh].to(picked.dtype)
        out[key] = picked
    return out
