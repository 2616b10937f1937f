"""The Trainer ``train_net.py`` uses: Detectron2's :class:`DefaultTrainer` with QuerySeg's mapper
registry, evaluator factory, optimizer (:mod:`common.engine.solver`) and strict checkpointer."""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm

from common.data.evaluation import build_evaluator
from common.data.mappers import build_mapper
from common.engine.checkpoint import QSCheckpointer
from common.engine.solver import build_optimizer
from common.engine.visualization import VisualizationHook


class Trainer(DefaultTrainer):
    """DefaultTrainer wired to QuerySeg's mappers, evaluators, optimizer and strict checkpointer."""

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
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
        hooks = super().build_hooks()
        if self.cfg.VIS_PERIOD > 0 and comm.is_main_process():
            writer_at = len(hooks) - 1  # DefaultTrainer puts the PeriodicWriter last
            hooks.insert(writer_at, VisualizationHook(self.cfg, self.cfg.VIS_PERIOD))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)
