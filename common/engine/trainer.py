"""The Trainer ``train_net.py`` uses: Detectron2's :class:`DefaultTrainer` with QuerySeg's mapper
registry, evaluator factory, optimizer (:mod:`common.engine.solver`) and strict checkpointer.

Exact resume, beyond Detectron2: every checkpoint also stores (under ``"exact_resume"``) the
data-stream position (:mod:`common.data.resumable`), the Python/NumPy/torch(/CUDA) RNG states of
every process (gathered on each checkpoint iteration) and the last values of every logged scalar
(``metrics.json`` smooths losses over 20 iterations). ``--resume`` restores all of it, so the
resumed run's losses equal the uninterrupted run's on the CPU. Evaluation during training runs
under a forked RNG, so it does not move the training RNGs either.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm

from common.data.evaluation import build_evaluator
from common.data.mappers import build_mapper
from common.data.resumable import build_resumable_train_loader
from common.data.validation import load_train_dicts
from common.engine.checkpoint import QSCheckpointer
from common.engine.resume import (
    SnapshotRNG,
    restore_storage,
    rng_state,
    set_rng_state,
    storage_state,
)
from common.engine.solver import build_optimizer
from common.engine.visualization import VisualizationHook
from common.modeling.sem_seg_tta import maybe_wrap_sem_seg_tta

logger = logging.getLogger(__name__)

# Detectron2's keys that its train loader, hooks and writers read during DefaultTrainer's
# construction and training (read here for runs that build no trainer: --eval-only, the guard's
# tests); the model, mapper, optimizer and scheduler keys are read by building those.
_TRAINER_KEYS = (
    "SEED",
    "OUTPUT_DIR",
    "VIS_PERIOD",
    "CUDNN_BENCHMARK",
    "SOLVER.IMS_PER_BATCH",
    "SOLVER.MAX_ITER",
    "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.REFERENCE_WORLD_SIZE",
    "SOLVER.AMP.ENABLED",
    "TEST.EVAL_PERIOD",
    "TEST.PRECISE_BN.ENABLED",
    "TEST.PRECISE_BN.NUM_ITER",
    "DATALOADER.NUM_WORKERS",
    "DATALOADER.ASPECT_RATIO_GROUPING",
    "DATALOADER.SAMPLER_TRAIN",
    "DATALOADER.REPEAT_THRESHOLD",
    "DATALOADER.REPEAT_SQRT",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
    "DATASETS.TRAIN",
    "DATASETS.TEST",
    "MODEL.LOAD_PROPOSALS",
    "MODEL.KEYPOINT_ON",
)


_WARNED_WORKERS: set[tuple[int, int]] = set()
# the training dicts Trainer.__init__ loaded and checked, for build_train_loader to reuse
_PRELOADED: dict[tuple, list[dict]] = {}


def _data_key(cfg: CfgNode) -> tuple:
    return (
        tuple(cfg.DATASETS.TRAIN),
        cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        cfg.INPUT.DATASET_MAPPER_NAME,
        cfg.MODEL.MASK_ON,
    )


def _mapper_needs_masks(cfg: CfgNode) -> bool:
    """Whether the training mapper turns every annotation into a mask."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    return name == "instance" or (name == "detectron2" and cfg.MODEL.MASK_ON)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def capped_num_workers(requested: int) -> int:
    """``DATALOADER.NUM_WORKERS`` capped at the cores available to each process, with a note."""
    cores = max(1, available_cores() // max(1, comm.get_local_size()))
    if requested > cores:
        if (requested, cores) not in _WARNED_WORKERS:
            _WARNED_WORKERS.add((requested, cores))
            logger.warning(
                f"DATALOADER.NUM_WORKERS {requested} > {cores} CPU core(s) per process: "
                f"using {cores} loader workers"
            )
        return cores
    return requested


class Trainer(DefaultTrainer):
    """DefaultTrainer wired to QuerySeg's mappers, evaluators, optimizer and strict checkpointer."""

    def __init__(self, cfg: CfgNode):
        # (iteration, per-rank RNG states) gathered by SnapshotRNG on checkpoint iterations
        self._rng_states: tuple[int, list[dict[str, Any]]] | None = None
        self._pending_resume: dict[str, Any] | None = None
        # load and check the training data before the model is built; the loader reuses it
        _PRELOADED[_data_key(cfg)] = load_train_dicts(cfg, need_masks=_mapper_needs_masks(cfg))
        try:
            super().__init__(cfg)
        finally:
            _PRELOADED.pop(_data_key(cfg), None)
        old = self.checkpointer
        self.checkpointer = QSCheckpointer.from_config(
            cfg, old.model, cfg.OUTPUT_DIR, **old.checkpointables
        )
        # the PeriodicCheckpointer hook was built with the old one
        for h in self._hooks:
            if getattr(h, "checkpointer", None) is old:
                h.checkpointer = self.checkpointer

    def build_hooks(self):
        """Detectron2's hooks plus, with ``VIS_PERIOD > 0``, ground-truth-vs-prediction images in
        TensorBoard (:class:`common.engine.visualization.VisualizationHook`) before the writers
        run."""
        ret = super().build_hooks()
        if self.cfg.VIS_PERIOD > 0 and comm.is_main_process():
            writer_at = len(ret) - 1  # DefaultTrainer puts the PeriodicWriter last
            ret.insert(writer_at, VisualizationHook(self.cfg, self.cfg.VIS_PERIOD))
        # the RNG snapshot goes right before the checkpointer (main process) or the EvalHook
        at = next(
            i
            for i, h in enumerate(ret)
            if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
        )
        ret.insert(at, SnapshotRNG(self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return ret

    # ---- exact resume -----------------------------------------------------------------------

    def _batch_sampler(self):
        return getattr(self._trainer.data_loader, "batch_sampler", None)

    def state_dict(self) -> dict[str, Any]:
        ret = super().state_dict()
        resume: dict[str, Any] = {"world_size": comm.get_world_size()}
        if self._rng_states is not None and self._rng_states[0] == self.iter:
            resume["rng"] = self._rng_states[1]  # a save at another iteration has none
        sampler = self._batch_sampler()
        if hasattr(sampler, "start_batch"):
            resume["data"] = {"seed": sampler.seed, "batches": self.iter + 1}
        storage = getattr(self, "storage", None)
        if storage is not None:
            resume["storage"] = storage_state(storage)
        ret["exact_resume"] = resume
        return ret

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_resume = state_dict.get("exact_resume")

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        pending = self._pending_resume
        if not (resume and pending):
            if resume and self.start_iter > 0:
                logger.warning(
                    "the checkpoint has no exact-resume state (data position, RNGs): the data "
                    "stream restarts, so the losses will differ from an uninterrupted run's"
                )
            self._pending_resume = None
            return
        if pending.get("world_size") != comm.get_world_size():
            logger.warning(
                f"resuming with {comm.get_world_size()} processes from a checkpoint of "
                f"{pending.get('world_size')}: RNG states and data stream cannot be continued "
                "exactly"
            )
            pending.pop("rng", None)
            pending.pop("data", None)
        sampler = self._batch_sampler()
        data = pending.get("data")
        if data is not None and hasattr(sampler, "start_batch"):
            sampler.seed = data["seed"]
            sampler.start_batch = data["batches"]
            logger.info(
                f"resuming the data stream at batch {data['batches']} (seed {data['seed']})"
            )

    def before_train(self) -> None:
        super().before_train()
        pending, self._pending_resume = self._pending_resume, None
        if not pending:
            return
        restore_storage(self.storage, pending.get("storage", {}))
        rng = pending.get("rng")
        if rng is not None:
            set_rng_state(rng[comm.get_rank()])

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """A resumable loader (:mod:`common.data.resumable`), workers capped at the cores."""
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = capped_num_workers(cfg.DATALOADER.NUM_WORKERS)
        mapper = build_mapper(cfg, is_train=True)
        dicts = _PRELOADED.get(_data_key(cfg))
        if dicts is None:
            dicts = load_train_dicts(cfg, need_masks=_mapper_needs_masks(cfg))
        loader = build_resumable_train_loader(cfg, mapper, dicts)
        if loader is None:
            logger.warning(
                f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN} is not resumable: "
                "--resume will restart the data stream"
            )
            loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        return loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=build_mapper(cfg, False),
            num_workers=capped_num_workers(cfg.DATALOADER.NUM_WORKERS),
        )

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """Detectron2's ``test`` under forked RNGs: evaluating leaves the training RNGs as they
        were (exact resume). With ``TEST.SEM_SEG_TTA.ENABLED`` the model is evaluated through
        the multi-scale + flip wrapper (same evaluators)."""
        states = rng_state()
        try:
            return super().test(cfg, maybe_wrap_sem_seg_tta(cfg, model), evaluators)
        finally:
            set_rng_state(states)

    @classmethod
    def read_run_config(cls, cfg: CfgNode, model: torch.nn.Module) -> None:
        """Read, without touching any dataset, every key a run reads besides the model's: the
        optimizer and LR schedule (built on ``model``), the training and test mappers, the
        evaluators' ``TEST.EVAL_TASKS`` and Detectron2's trainer, loader and hook keys, so that
        :func:`common.engine.config_guard.check_config_use` can judge a config before
        evaluation (``--eval-only``) or before training starts."""
        from common.data.evaluation import EVAL_TASKS

        QSCheckpointer.from_config(cfg, model)  # MODEL.WEIGHTS_STRICT / _TRUSTED
        _ = cfg.MODEL.WEIGHTS  # resume_or_load reads it
        optimizer = cls.build_optimizer(cfg, model)
        # the schedule's keys, also for a run that does not train (MAX_ITER 0 or below a step):
        # built on a clone (it records into the same tracker) with room for every step
        sched = cfg.clone()
        sched.defrost()
        sched.SOLVER.MAX_ITER = (
            max(
                int(cfg.SOLVER.MAX_ITER),
                int(cfg.SOLVER.WARMUP_ITERS),
                *map(int, cfg.SOLVER.STEPS),
                0,
            )
            + 1
        )
        cls.build_lr_scheduler(sched, optimizer)
        build_mapper(cfg, is_train=True)
        build_mapper(cfg, is_train=False)
        tasks = tuple(cfg.TEST.EVAL_TASKS)
        assert all(t in EVAL_TASKS for t in tasks), tasks
        for key in _TRAINER_KEYS:
            node = cfg
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]

    @classmethod
    def check_config(cls, cfg: CfgNode, model: torch.nn.Module) -> list[tuple[str, str]]:
        """:meth:`read_run_config` then :func:`common.engine.config_guard.check_config_use`:
        raise naming every key the config sets that this run does not use."""
        from common.engine.config_guard import check_config_use

        cls.read_run_config(cfg, model)
        return check_config_use(cfg)

    @classmethod
    def dry_check_config(cls, cfg: CfgNode) -> list[tuple[str, str]]:
        """:meth:`check_config` without data or weights: the model is built on the ``meta``
        device (no memory, no time), after the ``shapes`` datasets are registered with the
        config's sizes as ``train_net.py`` does. For tools that vet configs before a long run."""
        from detectron2.modeling import META_ARCH_REGISTRY

        from common.data.shapes import configure_shapes_from_cfg

        configure_shapes_from_cfg(cfg, generate=False)
        with torch.device("meta"):
            model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
        _ = cfg.MODEL.DEVICE  # build_model reads it
        return cls.check_config(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)
