"""Strict, safe checkpoint loading for training, ``--eval-only``, the demo and the benchmark.

:class:`QSCheckpointer` is Detectron2's checkpointer that loads through
:func:`common.convert.core.load_checkpoint_file` (``weights_only``), records the
meta-architecture in what it saves and refuses a checkpoint of another model, a checkpoint with
missing/unexpected keys or wrong shapes (``MODEL.WEIGHTS_STRICT False`` restores Detectron2's
warn-and-continue, e.g. to fine-tune with another number of classes).

Saving is atomic: the checkpoint is written to a temporary file in the same folder, synced and
renamed, and only then is ``last_checkpoint`` (itself replaced atomically) pointed at it, so a
process killed mid-write leaves the previous checkpoint as the one ``--resume`` loads. Weights
with a NaN/Inf are never saved: :class:`NonFiniteWeightsError` names the first such tensor.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from common.convert.core import CheckpointError, ConversionReport, load_checkpoint_file


class NonFiniteWeightsError(FloatingPointError):
    """The model holds NaN/Inf weights: training diverged; nothing is saved."""


def _atomic_write(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, sync it, then rename it to
    ``path``; a crash leaves ``path`` as it was (and at most a ``.tmp`` file that nothing loads)."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def first_non_finite(state: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding a NaN/Inf, or None."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                return name
    return None


def _prefixes(keys: Iterable[str], depth: int = 2) -> set[str]:
    return {".".join(k.split(".")[:depth]) for k in keys}


class QSCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads safely and strictly.

    - Saves ``meta_architecture`` with every checkpoint; loading a checkpoint of another
      meta-architecture is an error that names both.
    - ``strict`` (``MODEL.WEIGHTS_STRICT``): unexpected keys and shape mismatches are errors;
      missing keys are errors too, except for an initialisation checkpoint that covers only part
      of the model (an ImageNet backbone: keys only under ``backbone.``), where only the modules
      it covers must be complete.
    - ``trusted`` (``MODEL.WEIGHTS_TRUSTED``): allow full pickles; otherwise ``weights_only``.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = True, trusted: bool = False,
                 **checkpointables):  # fmt: skip
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict
        self.trusted = trusted
        self._loading = "<checkpoint>"

    @classmethod
    def from_config(cls, cfg, model, save_dir: str = "", **checkpointables) -> QSCheckpointer:
        return cls(model, save_dir, strict=cfg.MODEL.WEIGHTS_STRICT,
                   trusted=cfg.MODEL.WEIGHTS_TRUSTED, **checkpointables)  # fmt: skip

    def save(self, name: str, **kwargs: Any) -> None:
        """Detectron2's ``save``, written atomically and refused for non-finite weights (module
        docstring). Only the main process writes (``save_to_disk``)."""
        if not self.save_dir or not self.save_to_disk:
            return
        kwargs.setdefault("meta_architecture", type(self.model).__name__)
        data = {"model": self.model.state_dict()}
        bad = first_non_finite(data["model"])
        if bad is not None:
            last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
            raise NonFiniteWeightsError(
                f"not saving {name}.pth: model weight {bad} holds NaN/Inf (training diverged); "
                f"the last good checkpoint is {last}"
            )
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at a complete file, replacing the pointer atomically."""
        _atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )

    def load(self, path: str, checkpointables=None):
        self._loading = path
        return super().load(path, checkpointables)

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            data = load_checkpoint_file(filename, trusted=self.trusted)
            if isinstance(data, Mapping) and "model" in data and "__author__" in data:
                return dict(data)
            if isinstance(data, Mapping) and "blobs" in data:
                data = data["blobs"]
            model = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f: str):
        return load_checkpoint_file(f, trusted=self.trusted)

    def _load_model(self, checkpoint):
        path = self._loading
        ours = type(self.model).__name__
        theirs = checkpoint.get("meta_architecture")
        # a model may declare which other meta-architectures' checkpoints initialise it and
        # which of its keys such a checkpoint leaves fresh (e.g. QueryInstVIS from an image
        # QueryInst, as the paper initialises VIS from COCO): {name: (key prefixes, ...)}
        fresh_prefixes = getattr(self.model, "initialises_from", {}).get(theirs) if theirs else None
        if theirs and theirs != ours and self.strict and fresh_prefixes is None:
            raise CheckpointError(
                f"{path} is a checkpoint of {theirs}, but the config builds {ours} "
                "(check MODEL.WEIGHTS / --config-file)"
            )
        ckpt_keys = [k.removeprefix("module.") for k in checkpoint.get("model", {})]
        heuristic = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        if incompatible is None or not self.strict:
            return incompatible
        partial = heuristic or all(k.startswith("backbone.") for k in ckpt_keys)
        missing = list(incompatible.missing_keys)
        if fresh_prefixes is not None and theirs != ours:
            fresh = [k for k in missing if k.startswith(tuple(fresh_prefixes))]
            missing = [k for k in missing if not k.startswith(tuple(fresh_prefixes))]
            self.logger.info(
                f"{ours} initialised from a {theirs} checkpoint ({path}); "
                f"{len(fresh)} tensors under {', '.join(fresh_prefixes)} start fresh"
            )
        if partial:
            # BatchNorm fills in a missing num_batches_tracked itself: it proves no coverage
            covered = _prefixes(
                k
                for k in self.model.state_dict()
                if k not in missing and not k.endswith(".num_batches_tracked")
            )
            if not covered:
                raise CheckpointError(
                    f"{path}: none of its {len(ckpt_keys)} keys matches the {ours} model "
                    f"(first keys: {', '.join(ckpt_keys[:5])}); convert it with tools/convert_*.py"
                )
            missing = [k for k in missing if ".".join(k.split(".")[:2]) in covered]
        report = ConversionReport(
            missing=missing,
            unexpected=list(incompatible.unexpected_keys),
            shapes=list(incompatible.incorrect_shapes),
        )
        if not report.ok:
            hint = f" ({theirs} checkpoint)" if theirs else ""
            raise CheckpointError(
                f"{path}{hint} does not fit the {ours} model built from the config; not loading "
                "a partial model (MODEL.WEIGHTS_STRICT False loads what fits, as Detectron2 "
                "does, e.g. to fine-tune with another number of classes)\n" + report.format(10)
            )
        return incompatible
