"""The training/evaluation engine every QuerySeg method shares (used by ``train_net.py``).

- :func:`get_cfg` returns Detectron2's config with the common keys and every project's keys.
- :func:`merge_config` merges a YAML and ``KEY VALUE`` overrides, turning a misspelt key into an
  error that names the file and suggests the closest existing key.
- :class:`Trainer` is Detectron2's :class:`DefaultTrainer` with QuerySeg's mapper registry,
  evaluator factory and optimizer (AdamW/SGD, backbone LR multiplier, per-parameter-type weight
  decay, value/norm/full-model gradient clipping).
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import logging
import os
from typing import Any

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.config import get_cfg as _d2_get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as _d2_defaults
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm

from common.config import add_common_config

logger = logging.getLogger(__name__)

#: Project packages (``projects/<p>/<p>``); each exposes ``add_<p>_config`` and registers its
#: meta-architecture on import.
PROJECTS = ("knet", "queryinst", "fastinst", "embedmask")


def register_projects() -> list[Any]:
    """Import the shared ops (backbones, pixel decoder, DCN for Detectron2's ResNet) and every
    project package (registering its meta-arch); return the project modules."""
    importlib.import_module("common.ops")
    return [importlib.import_module(p) for p in PROJECTS]


def get_cfg() -> CfgNode:
    """Detectron2's default config plus QuerySeg's common keys and every project's keys."""
    cfg = _d2_get_cfg()
    add_common_config(cfg)
    for mod in register_projects():
        name = mod.__name__
        add_fn = getattr(mod, f"add_{name}_config", None)
        if add_fn is not None:
            add_fn(cfg)
    return cfg


def _all_keys(cfg: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, CfgNode):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _explain_key_error(cfg: CfgNode, err: Exception, source: str) -> KeyError:
    msg = str(err.args[0]) if err.args else str(err)
    if "Non-existent" not in msg:
        return err if isinstance(err, KeyError) else KeyError(f"{source}: {msg}")
    bad = msg.split(":")[-1].strip().strip("'\"")
    close = difflib.get_close_matches(bad, _all_keys(cfg), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return KeyError(f"{source}: unknown config key {bad}{hint}")


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def load_yaml_with_bases(path: str) -> dict[str, Any]:
    """Load a YAML config and its ``_BASE_`` chain into one plain dict.

    ``_BASE_`` may be one path or a list of paths (relative to the file), merged in order, then
    the file itself on top. A list lets a leaf combine a method base with a dataset overlay,
    e.g. ``_BASE_: [../Base-KNet.yaml, ../../../../common/configs/Shapes-Instance.yaml]``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(raw).__name__}")
    bases = raw.pop("_BASE_", None)
    if bases is None:
        return raw
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        _deep_update(merged, load_yaml_with_bases(base))
    return _deep_update(merged, raw)


def merge_config(cfg: CfgNode, config_file: str | None, opts: list[str] | None) -> CfgNode:
    """Merge ``config_file`` (with its ``_BASE_`` chain) then ``opts`` into ``cfg``, with errors
    that name the file and the bad key."""
    if config_file:
        loaded = load_yaml_with_bases(config_file)
        version = loaded.get("VERSION", cfg.VERSION)
        if version != cfg.VERSION:
            raise ValueError(f"{config_file}: VERSION {version} != {cfg.VERSION}")
        try:
            cfg.merge_from_other_cfg(CfgNode(loaded))
        except KeyError as e:
            raise _explain_key_error(cfg, e, config_file) from None
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError) as e:
            raise _explain_key_error(cfg, e, "command-line override") from None
    if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
        logger.warning("SOLVER.AMP.ENABLED is set but CUDA is absent: training in fp32 on the CPU")
        cfg.SOLVER.AMP.ENABLED = False
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def _is_norm(module: torch.nn.Module) -> bool:
    norm_types = (
        torch.nn.modules.batchnorm._BatchNorm,
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
        torch.nn.LocalResponseNorm,
        torch.nn.modules.instancenorm._InstanceNorm,
    )
    return isinstance(module, norm_types) or "FrozenBatchNorm" in type(module).__name__


def get_param_groups(cfg: CfgNode, model: torch.nn.Module) -> list[dict[str, Any]]:
    """One parameter group per trainable parameter with its LR and weight decay.

    Rules: parameters under ``backbone.`` get ``BASE_LR * BACKBONE_MULTIPLIER``; norm-layer weights
    and biases get ``WEIGHT_DECAY_NORM``; ``nn.Embedding`` weights and names matching
    ``NO_DECAY_KEYWORDS`` get ``WEIGHT_DECAY_EMBED`` / 0; other biases get ``WEIGHT_DECAY_BIAS``
    (when set).
    """
    s = cfg.SOLVER
    wd_bias = s.WEIGHT_DECAY_BIAS if s.WEIGHT_DECAY_BIAS is not None else s.WEIGHT_DECAY
    groups, seen = [], set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            full = f"{mod_name}.{name}" if mod_name else name
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if full.startswith("backbone.") or ".backbone." in full:
                lr = lr * s.BACKBONE_MULTIPLIER
            if _is_norm(module):
                wd = s.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding):
                wd = s.WEIGHT_DECAY_EMBED
            elif any(k in full for k in s.NO_DECAY_KEYWORDS):
                wd = 0.0
            elif name == "bias":
                wd = wd_bias
            groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": full})
    return groups


def _full_model_clipping(optim_cls: type, clip_norm: float) -> type:
    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            return super().step(closure=closure)

    return FullModelGradientClipping


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`get_param_groups`, with Detectron2's gradient clipping options plus
    ``CLIP_TYPE: "full_model"`` (one norm over all parameters, as Mask2Former does)."""
    groups = get_param_groups(cfg, model)
    for g in groups:
        g.pop("name")
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        cls, kwargs = torch.optim.AdamW, {"betas": tuple(cfg.SOLVER.BETAS)}
    elif name == "SGD":
        cls, kwargs = torch.optim.SGD, {
            "momentum": cfg.SOLVER.MOMENTUM,
            "nesterov": cfg.SOLVER.NESTEROV,
        }
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = _full_model_clipping(cls, clip.CLIP_VALUE)
    elif clip.ENABLED:
        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)


def _create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model``, but CPU modules get ``device_ids=None`` (gloo), which
    PyTorch's DistributedDataParallel requires."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = _d2_defaults.create_ddp_model
_d2_defaults.create_ddp_model = _create_ddp_model  # DefaultTrainer.__init__ looks it up here


class Trainer(DefaultTrainer):
    """DefaultTrainer wired to QuerySeg's mappers, evaluators, optimizer and strict checkpointer."""

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
        from common.checkpoint import QSCheckpointer

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
        TensorBoard (:class:`common.visualization.VisualizationHook`) before the writers run."""
        hooks = super().build_hooks()
        if self.cfg.VIS_PERIOD > 0 and comm.is_main_process():
            from common.visualization import VisualizationHook

            writer_at = len(hooks) - 1  # DefaultTrainer puts the PeriodicWriter last
            hooks.insert(writer_at, VisualizationHook(self.cfg, self.cfg.VIS_PERIOD))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        from common.data.mappers import build_mapper

        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        from common.data.mappers import build_mapper

        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        from common.data.evaluation import build_evaluator

        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)
