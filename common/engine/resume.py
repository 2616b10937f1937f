"""What a checkpoint needs beyond Detectron2's for an exact resume (used by
:class:`common.engine.trainer.Trainer`): every process's RNG states, gathered on each checkpoint
iteration, and the last values of each logged scalar (``metrics.json`` smooths the losses over
the last 20 iterations, so a resumed run must start with the same history). Everything is stored
as tensors and plain containers, loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

# logged scalars kept per name for the writers' smoothing windows (Detectron2's default is 20)
HISTORY_KEPT = 100


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA RNG states as tensors and plain containers
    (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.as_tensor(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SnapshotRNG(HookBase):
    """On every iteration that the checkpointer saves, gather each process's RNG states to the
    trainer (a collective call, so it runs on every rank, before the main-process-only
    checkpointer)."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self) -> None:
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it >= self.trainer.max_iter - 1:
            state = rng_state()
            states = comm.all_gather(state) if comm.get_world_size() > 1 else [state]
            self.trainer._rng_states = (it, states)


def storage_state(storage: EventStorage) -> dict[str, Any]:
    """The last :data:`HISTORY_KEPT` ``(value, iteration)`` pairs and the smoothing hint of every
    scalar in ``storage``."""
    hints = storage.smoothing_hints()
    return {
        name: {
            "values": [(float(v), int(i)) for v, i in buf.values()[-HISTORY_KEPT:]],
            "smoothing_hint": hints.get(name, True),
        }
        for name, buf in storage.histories().items()
    }


def restore_storage(storage: EventStorage, state: dict[str, Any]) -> None:
    """Put back what :func:`storage_state` returned (Detectron2 has no public API for it)."""
    for name, entry in state.items():
        for value, it in entry["values"]:
            storage._history[name].update(value, it)
        storage._smoothing_hints[name] = entry["smoothing_hint"]
