"""Start-up: the one place QuerySeg changes Detectron2, called explicitly, never on import.

:func:`setup_queryseg` (idempotent) is what ``train_net.py``, ``demo/demo.py`` and the tools call
before they build a model:

- Detectron2's ResNet uses ``common.ops.deform_conv``'s ``DeformConv``/``ModulatedDeformConv``
  (:func:`common.ops.deform_conv.patch_detectron2`), so ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``
  works without Detectron2's ``_C``;
- ``detectron2.engine.defaults.create_ddp_model`` gives CPU modules ``device_ids=None`` (gloo);
- the shared backbones and pixel decoder are registered (``import common.modeling``), and every
  installed project package is imported (:func:`common.engine.projects.load_projects`), which
  registers its meta-architecture, heads and loss/cost terms.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from detectron2.engine import defaults as _d2_defaults
from detectron2.utils import comm

from common.engine.projects import load_projects
from common.ops.deform_conv import patch_detectron2 as _patch_deform_conv

_d2_create_ddp_model = _d2_defaults.create_ddp_model


def _create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model``, but CPU modules get ``device_ids=None`` (gloo), which
    PyTorch's DistributedDataParallel requires."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


def patch_detectron2() -> None:
    """Apply QuerySeg's two changes to Detectron2 (DCN classes of its ResNet, CPU-aware
    ``create_ddp_model``). Idempotent."""
    _patch_deform_conv()
    _d2_defaults.create_ddp_model = _create_ddp_model  # DefaultTrainer.__init__ looks it up here


def setup_queryseg() -> None:
    """Patch Detectron2, register the shared modeling parts and load every project. Idempotent."""
    patch_detectron2()
    importlib.import_module("common.modeling")
    load_projects()
