"""A training data loader whose stream is a pure function of (seed, batch number), so that
``--resume`` continues it exactly where the checkpoint left it.

Detectron2's train loader restarts its stream on resume and seeds each loader worker once, so
what a worker produces depends on everything it produced before. Here:

- the sampler (Detectron2's ``TrainingSampler`` / ``RepeatFactorTrainingSampler``, infinite and
  seeded) gives this rank's indices; :class:`ResumableBatchSampler` numbers them and groups them
  into batches (by aspect ratio from the dataset dicts' ``width``/``height``, when asked), so
  batch ``k`` is known without mapping anything and the stream can start at any ``k``;
- :class:`PositionedMapDataset` maps sample ``(position, index)`` under Python/NumPy/torch RNGs
  seeded from ``(seed, rank, position)`` and restores the caller's RNGs afterwards: the
  augmentations of a sample do not depend on the worker that maps it nor on what it mapped
  before, so each worker's RNG state is fully given by the position (0, 2 or 8 workers give the
  same batches), and mapping in the main process (0 workers) leaves the training RNGs alone.

The data-stream state is then ``{"seed", "batches", "rank", "world_size"}``; the Trainer stores it
in every checkpoint and sets ``start_batch`` on resume.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList
from detectron2.data.build import _train_loader_from_config, trivial_batch_collator
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def sample_seed(seed: int, rank: int, position: int) -> int:
    """The RNG seed of this rank's sample number ``position`` (stable across runs, < 2**32)."""
    digest = hashlib.sha256(f"{seed}:{rank}:{position}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class ResumableBatchSampler:
    """Infinite batches of ``(position, index)`` pairs for one rank, startable at any batch.

    Args:
        sampler: an infinite, seeded index sampler already sharded for this rank (Detectron2's
            ``TrainingSampler``/``RepeatFactorTrainingSampler``).
        batch_size: images per batch on this rank.
        aspect_ratios: per dataset index, 0 if width > height else 1, to batch images of one
            orientation together (Detectron2's aspect-ratio grouping); None: plain batches.
        start_batch: the number of batches already consumed (resume).
    """

    def __init__(
        self,
        sampler: torchdata.Sampler,
        batch_size: int,
        aspect_ratios: list[int] | None = None,
        start_batch: int = 0,
    ):
        self.sampler = sampler
        self.batch_size = batch_size
        self.aspect_ratios = aspect_ratios
        self.start_batch = start_batch

    @property
    def seed(self) -> int:
        return int(self.sampler._seed)

    @seed.setter
    def seed(self, value: int) -> None:
        self.sampler._seed = int(value)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        buckets: list[list[tuple[int, int]]] = [[], []]
        emitted = 0
        for position, index in enumerate(self.sampler):
            b = self.aspect_ratios[index] if self.aspect_ratios is not None else 0
            buckets[b].append((position, int(index)))
            if len(buckets[b]) == self.batch_size:
                batch, buckets[b] = buckets[b], []
                if emitted >= self.start_batch:
                    yield batch
                emitted += 1


class _ForkedRNG:
    """Seed Python, NumPy and torch (CPU) RNGs inside the block; restore the caller's after."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self._states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        py, npy, pt = self._states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


class PositionedMapDataset(torchdata.Dataset):
    """Maps ``(position, index)`` with RNGs seeded from ``(seed, rank, position)``.

    A mapper that returns None (drops the sample) is retried on other indices drawn from the
    same seeded generator, as Detectron2's ``MapDataset`` does with its own."""

    def __init__(self, dataset: list[dict], mapper: Callable, batch_sampler: ResumableBatchSampler,
                 rank: int):  # fmt: skip
        self._dataset = DatasetFromList(dataset, copy=False, serialize=True)
        self._mapper = mapper
        self._batch_sampler = batch_sampler
        self._rank = rank

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        position, index = key
        seed = sample_seed(self._batch_sampler.seed, self._rank, position)
        with _ForkedRNG(seed):
            retry = random.Random(seed)
            for _ in range(100):
                out = self._mapper(self._dataset[index])
                if out is not None:
                    return out
                index = retry.randrange(len(self._dataset))
        raise RuntimeError(f"the mapper dropped 100 samples in a row (last index {index})")


def build_resumable_train_loader(
    cfg: CfgNode, mapper: Callable, dataset: list[dict] | None = None
) -> torchdata.DataLoader | None:
    """Detectron2's train loader built from ``cfg`` with a resumable stream (module docstring).

    ``dataset``: the training dicts, if already loaded. Returns None for a sampler that is not an
    infinite seeded index stream (the caller then uses Detectron2's loader, and resume restarts
    the stream)."""
    kw = _train_loader_from_config(cfg, mapper=mapper, dataset=dataset)
    sampler, dataset = kw["sampler"], kw["dataset"]
    if not hasattr(sampler, "_seed") or not isinstance(dataset, list):
        return None
    if cfg.SEED >= 0:  # the same stream for the same seed, whatever else drew random numbers
        sampler._seed = cfg.SEED
    world = comm.get_world_size()
    total = kw["total_batch_size"]
    if total <= 0 or total % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of "
            f"processes ({world})"
        )
    ratios = None
    if kw["aspect_ratio_grouping"]:
        ratios = [0 if d.get("width", 1) > d.get("height", 1) else 1 for d in dataset]
    batch_sampler = ResumableBatchSampler(sampler, total // world, ratios)
    return torchdata.DataLoader(
        PositionedMapDataset(dataset, kw["mapper"], batch_sampler, comm.get_rank()),
        batch_sampler=batch_sampler,
        num_workers=kw["num_workers"],
        collate_fn=trivial_batch_collator,
        # the iterator's base seed comes from here, not from the training RNG
        generator=torch.Generator().manual_seed(0),
        # workers are re-seeded per sample; Detectron2's worker_init_fn would be redundant
        pin_memory=False,
    )
