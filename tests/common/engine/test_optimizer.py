"""The shared optimizer: backbone LR multiplier, per-parameter-type weight decay, clipping."""

import torch
from torch import nn

from common.engine import build_optimizer, get_cfg, get_param_groups


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
        self.query_embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)


def _cfg(**solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def test_param_groups_follow_the_rules():
    groups = {g["name"]: g for g in get_param_groups(_cfg(), _Net())}
    assert groups["backbone.0.weight"]["lr"] == 1e-4
    assert groups["backbone.0.weight"]["weight_decay"] == 0.05
    assert groups["backbone.1.weight"]["weight_decay"] == 0.0  # GroupNorm
    assert groups["backbone.1.bias"]["lr"] == 1e-4
    assert groups["query_embed.weight"]["weight_decay"] == 0.0  # nn.Embedding
    assert groups["head.weight"]["lr"] == 1e-3
    assert groups["head.weight"]["weight_decay"] == 0.05


def test_no_decay_keywords_and_frozen_params():
    net = _Net()
    net.head.bias.requires_grad_(False)
    groups = {g["name"]: g for g in get_param_groups(_cfg(NO_DECAY_KEYWORDS=("head",)), net)}
    assert groups["head.weight"]["weight_decay"] == 0.0
    assert "head.bias" not in groups


def test_no_decay_keywords_win_over_the_norm_rule():
    net = _Net()
    cfg = _cfg(WEIGHT_DECAY_NORM=0.05, NO_DECAY_KEYWORDS=("backbone.1.weight",))
    groups = {g["name"]: g for g in get_param_groups(cfg, net)}
    assert groups["backbone.1.weight"]["weight_decay"] == 0.0  # GroupNorm picked by name
    assert groups["backbone.1.bias"]["weight_decay"] == 0.05  # the norm rule otherwise


def test_adamw_and_sgd_are_built():
    assert isinstance(build_optimizer(_cfg(), _Net()), torch.optim.AdamW)
    opt = build_optimizer(_cfg(OPTIMIZER="SGD"), _Net())
    assert isinstance(opt, torch.optim.SGD)


def test_full_model_clipping_bounds_the_global_norm():
    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    net = _Net()
    opt = build_optimizer(cfg, net)
    for p in net.parameters():
        p.grad = torch.full_like(p, 10.0)
    opt.step()
    total = torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert total <= 0.01 + 1e-6


def test_unknown_optimizer_is_named():
    import pytest

    with pytest.raises(ValueError, match="LAMB"):
        build_optimizer(_cfg(OPTIMIZER="LAMB"), _Net())
