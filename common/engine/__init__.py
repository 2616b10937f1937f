"""The engine every QuerySeg method shares (used by ``train_net.py``, the demo and the tools).

- ``defaults``: ``add_common_config``, the only writer of shared config keys;
- ``config``: ``get_cfg`` (common keys plus every project's), ``merge_config``;
- ``finalize``: ``finalize_config`` (``MODEL.TASK``, ``MODEL.NUM_CLASSES`` and what follows);
- ``projects``: project discovery (entry points ``queryseg.projects``);
- ``launch``: ``setup_queryseg``, the explicit start-up call that patches Detectron2;
- ``solver``: parameter groups and the optimizer; ``trainer``: ``Trainer``;
- ``checkpoint``: ``QSCheckpointer``; ``visualization``: the TensorBoard hook.
"""

from common.engine.config import get_cfg, load_yaml_with_bases, merge_config
from common.engine.finalize import finalize_config
from common.engine.launch import setup_queryseg
from common.engine.solver import build_optimizer, get_param_groups
from common.engine.trainer import Trainer

__all__ = [
    "Trainer",
    "build_optimizer",
    "finalize_config",
    "get_cfg",
    "get_param_groups",
    "load_yaml_with_bases",
    "merge_config",
    "setup_queryseg",
]
