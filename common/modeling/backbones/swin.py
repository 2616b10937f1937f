"""Swin Transformer (Liu et al., ICCV 2021) from timm as a Detectron2 backbone with res2-res5.

Follows the official Swin detection backbone (and Mask2Former's ``D2SwinTransformer``): outputs
``res2..res5`` at strides 4/8/16/32 with C, 2C, 4C, 8C channels, each through its own LayerNorm
(``norm0..norm3``); any input size works (the image is padded to a multiple of 32 and every block
pads its map to a multiple of the window, padding first and shifting second, as the official
code does; outputs are cropped back to ceil(H / stride)). Blocks, patch embedding and patch
merging are timm's modules, so parameter names are timm's (``patch_embed.proj``,
``layers.{i}.blocks.{j}.attn.qkv``, ``layers.{i}.downsample`` at the *start* of stage i);
official Swin checkpoints (ImageNet or detection) load after ``convert_swin_weights`` (which moves
``downsample`` one stage up). Not supported: absolute position embedding (APE) and mmcv-format
Swin checkpoints (their patch-merging weights are stored in another channel order).

Presets (``MODEL.SWIN``): T = 96, [2, 2, 6, 2], [3, 6, 12, 24]; S = 96, [2, 2, 18, 2],
[3, 6, 12, 24]; B = 128, [2, 2, 18, 2], [4, 8, 16, 32]; L = 192, [2, 2, 18, 2], [6, 12, 24, 48];
window 7 (12 for the 384 ImageNet-22K weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from common.convert.core import convert_state_dict
from common.convert.rules import strip_wrappers, swin_layout, swin_rules

__all__ = ["SwinBackbone", "build_swin_backbone", "build_swin_fpn_backbone", "convert_swin_weights"]

_STAGE_NAMES = ("res2", "res3", "res4", "res5")


def _window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ws -> (B * H/ws * W/ws, ws * ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def _window_reverse(windows: Tensor, ws: int, H: int, W: int) -> Tensor:
    """(B * H/ws * W/ws, ws * ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def _shift_mask(Hp: int, Wp: int, ws: int, shift: int, like: Tensor) -> Tensor:
    """(nW, ws*ws, ws*ws) additive mask (0 / -100) separating the regions of a cyclic shift."""
    img = torch.zeros((1, Hp, Wp, 1), device=like.device, dtype=like.dtype)
    region = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = region
            region += 1
    windows = _window_partition(img, ws).squeeze(-1)  # (nW, ws*ws)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _swin_block(block: nn.Module, x: Tensor, ws: int, shift: int, mask: Tensor | None) -> Tensor:
    """One timm ``SwinTransformerBlock`` in the official order: pad, shift, window attention.

    Args:
        block: the timm block (its norm1, attn, norm2, mlp and drop_path{1,2} are used).
        x: (B, H, W, C).
        ws, shift: window size and cyclic shift (0 for W-MSA).
        mask: the shift mask for the padded size, or None when ``shift`` is 0.

    Returns:
        (B, H, W, C).
    """
    B, H, W, C = x.shape
    y = block.norm1(x)
    pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    y = block.attn(_window_partition(y, ws), mask=mask)
    y = _window_reverse(y, ws, Hp, Wp)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    x = x + block.drop_path1(y[:, :H, :W, :])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class SwinBackbone(Backbone):
    """Swin Transformer backbone: dict of ``res2..res5`` (N, C * 2^i, ceil(H / s), ceil(W / s))."""

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        patch_size: int = 4,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        out_features: Sequence[str] = _STAGE_NAMES,
        use_checkpoint: bool = False,
    ) -> None:
        """
        Args:
            embed_dim: channels C of res2; stage i has C * 2^i.
            depths, num_heads: blocks and attention heads per stage.
            window_size: attention window (tokens per side).
            mlp_ratio, qkv_bias, drop_rate, attn_drop_rate: as in Swin.
            drop_path_rate: stochastic depth, increasing linearly over all blocks.
            patch_size: patch embedding stride (res2 stride).
            in_chans: image channels.
            pretrain_img_size: image size of the pretrained weights (timm's ``img_size``).
            out_features: subset of res2..res5; later stages are not built.
            use_checkpoint: activation checkpointing per block while training.
        """
        super().__init__()
        unknown = set(out_features) - set(_STAGE_NAMES)
        if unknown:
            raise ValueError(f"unknown Swin out_features {sorted(unknown)}")
        num_stages = max(_STAGE_NAMES.index(f) for f in out_features) + 1
        timm_swin = SwinTransformer(
            img_size=pretrain_img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            always_partition=True,
            strict_img_size=False,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.patch_embed = timm_swin.patch_embed
        self.layers = timm_swin.layers[:num_stages]
        self.window_size = window_size
        self.use_checkpoint = use_checkpoint
        self._out_features = list(out_features)
        self._out_feature_channels = {}
        self._out_feature_strides = {}
        for i, name in enumerate(_STAGE_NAMES[:num_stages]):
            channels = embed_dim * 2**i
            if name in self._out_features:
                self.add_module(f"norm{i}", nn.LayerNorm(channels))
                self._out_feature_channels[name] = channels
                self._out_feature_strides[name] = patch_size * 2**i
        self._pad_multiple = patch_size * 2 ** (len(depths) - 1)

    @property
    def size_divisibility(self) -> int:
        return self._pad_multiple

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def _run_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        x = stage.downsample(x)
        B, H, W, C = x.shape
        ws = self.window_size
        shift = ws // 2
        Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
        mask = _shift_mask(Hp, Wp, ws, shift, x) if len(stage.blocks) > 1 else None
        for j, block in enumerate(stage.blocks):
            s, m = (shift, mask) if j % 2 == 1 else (0, None)
            if self.use_checkpoint and self.training and x.requires_grad:
                x = checkpoint(_swin_block, block, x, ws, s, m, use_reentrant=False)
            else:
                x = _swin_block(block, x, ws, s, m)
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """
        Args:
            x: (N, C_in, H, W) images, any H and W.

        Returns:
            {"res{i+2}": (N, C * 2^i, ceil(H / s_i), ceil(W / s_i))} for the out features,
            s_i = patch_size * 2^i.
        """
        H, W = x.shape[-2:]
        pad_b = (self._pad_multiple - H % self._pad_multiple) % self._pad_multiple
        pad_r = (self._pad_multiple - W % self._pad_multiple) % self._pad_multiple
        y = self.patch_embed(F.pad(x, (0, pad_r, 0, pad_b)))  # (N, H/4, W/4, C), NHWC
        outputs = {}
        for i, stage in enumerate(self.layers):
            y = self._run_stage(stage, y)
            name = _STAGE_NAMES[i]
            if name in self._out_features:
                s = self._out_feature_strides[name]
                out = getattr(self, f"norm{i}")(y)[:, : math.ceil(H / s), : math.ceil(W / s)]
                outputs[name] = out.permute(0, 3, 1, 2).contiguous()
        return outputs


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> SwinBackbone:
    """``MODEL.BACKBONE.NAME: build_swin_backbone``: reads ``MODEL.SWIN.*``
    (common.engine.model_defaults)."""
    s = cfg.MODEL.SWIN
    return SwinBackbone(
        embed_dim=s.EMBED_DIM,
        depths=tuple(s.DEPTHS),
        num_heads=tuple(s.NUM_HEADS),
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        drop_rate=s.DROP_RATE,
        attn_drop_rate=s.ATTN_DROP_RATE,
        drop_path_rate=s.DROP_PATH_RATE,
        patch_size=s.PATCH_SIZE,
        in_chans=input_shape.channels,
        pretrain_img_size=s.PRETRAIN_IMG_SIZE,
        out_features=tuple(s.OUT_FEATURES),
        use_checkpoint=s.USE_CHECKPOINT,
    )


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """Swin + Detectron2 FPN (``MODEL.FPN.*``, P2-P6 with a max-pooled P6, as for ResNet-FPN)."""
    bottom_up = build_swin_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def convert_swin_weights(state_dict: Mapping[str, object]) -> dict[str, object]:
    """Rename an official or timm Swin state dict (ImageNet classification or detection) to ours.

    Official: ``layers.{i}.downsample`` (end of stage i) becomes ``layers.{i+1}.downsample``
    (timm: start of stage i + 1); timm-layout dicts keep their names. Buffers
    (``relative_position_index``, ``attn_mask``), the classifier (``head.*``) and its final
    ``norm.*`` are dropped; detection ``norm0..norm3`` are kept. A ``model``/``state_dict``
    wrapper and a ``module.``/``backbone.`` prefix are removed. The rules are
    ``common.convert.rules.swin_rules`` (also used by ``tools/convert_backbone.py``).

    Args:
        state_dict: {name: tensor} (``patch_embed.proj.weight``, ``layers.0.blocks.0...``).

    Returns:
        {name: tensor} for ``SwinBackbone.load_state_dict``, without a ``backbone.`` prefix.

    Raises:
        ValueError: an mmcv-format Swin checkpoint; KeyError: keys no rule maps (e.g. APE).
    """
    sd = strip_wrappers(state_dict)
    layout = swin_layout(sd)
    if layout == "mmcv":
        raise ValueError("mmcv-format Swin keys (stages.*, w_msa): convert to the official layout")
    out, report = convert_state_dict(sd, swin_rules(layout=layout))
    if report.unmapped:
        raise KeyError(f"unexpected Swin keys {report.unmapped}")
    return out
