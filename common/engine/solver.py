"""The optimizer every QuerySeg method shares: AdamW/SGD, a backbone LR multiplier,
per-parameter-type weight decay, and value/norm/full-model gradient clipping."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping


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

    Rules: parameters under ``backbone.`` get ``BASE_LR * BACKBONE_MULTIPLIER``; names containing
    one of ``NO_DECAY_KEYWORDS`` get weight decay 0 (first, so a keyword can pick some norm layers
    out, as mmengine's ``paramwise_cfg.custom_keys`` do by name); other norm-layer weights and
    biases get ``WEIGHT_DECAY_NORM``; ``nn.Embedding`` weights ``WEIGHT_DECAY_EMBED``; other biases
    ``WEIGHT_DECAY_BIAS`` (when set).
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
            if any(k in full for k in s.NO_DECAY_KEYWORDS):
                wd = 0.0
            elif _is_norm(module):
                wd = s.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding):
                wd = s.WEIGHT_DECAY_EMBED
            elif name == "bias":
                wd = wd_bias
            groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": full})
    return groups


def _full_model_clipping(optim_cls: type, clip_norm: float, norm_type: float = 2.0) -> type:
    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type=norm_type)
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
        cls, kwargs = (
            torch.optim.SGD,
            {
                "momentum": cfg.SOLVER.MOMENTUM,
                "nesterov": cfg.SOLVER.NESTEROV,
            },
        )
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = _full_model_clipping(cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    elif clip.ENABLED:
        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
