"""EmbedMask's pixel and proposal embedding heads and the Gaussian-like mask probability.

Provenance: EmbedMask v2 (yinghdb/EmbedMask e9d6142, ``EmbedMaskHead``), with the same
parameter names (``mask_tower``, ``pixel_{spatial,other}_embed_pred``,
``proposal_{spatial,other}_embed_pred``, ``proposal_margin_pred``, ``margin_scales``,
``position_scale``) so a v2 checkpoint maps by a prefix rename. Differences: the THC CUDA
``maskprob`` op is replaced by a vectorised PyTorch computation (:func:`mask_log_probability`);
the v1.5 scalar margin is an option.
"""

from __future__ import annotations

import math

import torch
from detectron2.config import CfgNode, configurable
from torch import Tensor, nn
from torch.nn import functional as F

from .fcos import Scale, compute_locations

#: Coordinates are added to the spatial embedding dims in units of 100 input pixels (v2 default).
POSITION_UNIT = 100.0
#: Number of "spatial" embedding dims (x, y) that receive pixel coordinates.
SPATIAL_DIMS = 2


def mask_log_probability(pixel_embed: Tensor, proposal_embed: Tensor, margin: Tensor) -> Tensor:
    """log p_ik = -sum_d m_kd (e_id - q_kd)^2, the log of EmbedMask's mask probability.

    Computed in float32 as sum_d m e^2 - 2 (m q) . e + sum_d m q^2 (two small matmuls, no
    [N, P, D] intermediate) after subtracting the (detached) mean pixel embedding from both sides,
    which leaves the distances unchanged and keeps the expansion well conditioned.

    Args:
        pixel_embed: [P, D] pixel embeddings e_i.
        proposal_embed: [N, D] proposal embeddings q_k.
        margin: [N, D] per-dim precisions m_k > 0 (the paper's 1 / (2 sigma^2)).

    Returns:
        [N, P] log-probabilities (<= 0).
    """
    with torch.autocast(device_type=pixel_embed.device.type, enabled=False):
        e, q, m = pixel_embed.float(), proposal_embed.float(), margin.float()
        center = e.mean(dim=0, keepdim=True).detach() if e.shape[0] else e.new_zeros(1, e.shape[1])
        e, q = e - center, q - center
        dist = (m @ (e * e).t()) - 2 * ((m * q) @ e.t()) + (m * q * q).sum(1, keepdim=True)
        return -dist.clamp(min=0)


class EmbedMaskHead(nn.Module):
    """Pixel embeddings on the finest FPN level and per-location proposal embeddings + margins.

    Pixel head: P3 -> ``mask_tower`` -> 2 spatial (+ position) and D-2 free channels, upsampled by
    ``mask_scale_factor``. Proposal head, on each level's FCOS box tower: 2 spatial (+ position)
    and D-2 free channels; margin = exp(conv(box_tower / margin_reduce_factor)), the spatial
    margins multiplied by a per-level Scale first. ``position_scale`` is shared by both heads.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int,
        embed_dim: int = 16,
        mask_num_convs: int = 4,
        norm: str = "GN",
        mask_scale_factor: int = 2,
        prior_margin: float = 2.0,
        margin_reduce_factor: float = 32.0,
        margin_per_dim: bool = True,
        fix_margin: bool = False,
        position_unit: float = POSITION_UNIT,
    ):
        """
        Args:
            in_channels: FPN channels (256).
            num_levels: number of FCOS levels (one margin Scale each).
            embed_dim: D, including the 2 spatial dims.
            mask_num_convs: depth of the pixel tower; norm: "GN" or "".
            mask_scale_factor: bilinear upsampling of the pixel embeddings (stride 8 -> 8 / f).
            prior_margin: distance at which the initial probability is 0.5 along one dim.
            margin_reduce_factor: divisor of the box-tower features fed to the margin conv.
            margin_per_dim: D margins per proposal (v2); False: one scalar margin (v1.5).
            fix_margin: use the prior precision instead of the predicted one.
            position_unit: input pixels per unit of the coordinates added to the spatial dims
                (v2: 100, sized for ~800 px COCO inputs).
        """
        super().__init__()
        if embed_dim <= SPATIAL_DIMS:
            raise ValueError(f"MODEL.EMBEDMASK.EMBED_DIM must be > {SPATIAL_DIMS}, got {embed_dim}")
        self.embed_dim = embed_dim
        self.mask_scale_factor = mask_scale_factor
        self.margin_reduce_factor = margin_reduce_factor
        self.margin_per_dim = margin_per_dim
        self.fix_margin = fix_margin
        if position_unit <= 0:
            raise ValueError(f"MODEL.EMBEDMASK.POSITION_UNIT must be > 0, got {position_unit}")
        self.position_unit = float(position_unit)
        #: exp(bias) is the prior precision: p = 0.5 at ``prior_margin`` along one dim.
        self.prior_precision = -math.log(0.5) / prior_margin**2
        tower: list[nn.Module] = []
        for _ in range(mask_num_convs):
            tower.append(nn.Conv2d(in_channels, in_channels, 3, padding=1))
            if norm == "GN":
                tower.append(nn.GroupNorm(32, in_channels))
            tower.append(nn.ReLU())
        self.mask_tower = nn.Sequential(*tower)
        free = embed_dim - SPATIAL_DIMS
        self.pixel_spatial_embed_pred = nn.Conv2d(in_channels, SPATIAL_DIMS, 3, padding=1)
        self.pixel_other_embed_pred = nn.Conv2d(in_channels, free, 3, padding=1)
        self.proposal_spatial_embed_pred = nn.Conv2d(in_channels, SPATIAL_DIMS, 3, padding=1)
        self.proposal_other_embed_pred = nn.Conv2d(in_channels, free, 3, padding=1)
        num_margins = embed_dim if margin_per_dim else 1
        self.proposal_margin_pred = nn.Conv2d(in_channels, num_margins, 3, padding=1)
        if margin_per_dim:
            self.margin_scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        self.position_scale = Scale(1.0)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.proposal_margin_pred.bias, math.log(self.prior_precision))

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int) -> dict:
        e = cfg.MODEL.EMBEDMASK
        return {
            "in_channels": in_channels,
            "num_levels": len(cfg.MODEL.FCOS.IN_FEATURES),
            "embed_dim": e.EMBED_DIM,
            "mask_num_convs": e.MASK_NUM_CONVS,
            "norm": cfg.MODEL.FCOS.NORM,
            "mask_scale_factor": e.MASK_SCALE_FACTOR,
            "prior_margin": e.PRIOR_MARGIN,
            "margin_reduce_factor": e.MARGIN_REDUCE_FACTOR,
            "margin_per_dim": e.MARGIN_PER_DIM,
            "fix_margin": e.FIX_MARGIN,
            "position_unit": e.POSITION_UNIT,
        }

    def _position(self, locations: Tensor, h: int, w: int) -> Tensor:
        """[h*w, 2] (x, y) locations -> [1, 2, h, w] scaled coordinates for the spatial dims."""
        pos = locations.t().reshape(1, SPATIAL_DIMS, h, w)
        return self.position_scale(pos / self.position_unit)

    def pixel_embedding(self, feature: Tensor, stride: int) -> Tensor:
        """Pixel embeddings e.

        Args:
            feature: [B, C, H, W] finest FPN level (P3) with stride ``stride``.

        Returns:
            [B, D, H * f, W * f] with f = ``mask_scale_factor`` (stride ``stride / f``).
        """
        x = self.mask_tower(feature)
        h, w = feature.shape[-2:]
        locations = compute_locations(h, w, stride, feature.device).to(x.dtype)
        spatial = self.pixel_spatial_embed_pred(x) + self._position(locations, h, w)
        embed = torch.cat([spatial, self.pixel_other_embed_pred(x)], dim=1)
        if self.mask_scale_factor != 1:
            embed = F.interpolate(
                embed, scale_factor=self.mask_scale_factor, mode="bilinear", align_corners=False
            )
        return embed

    def proposal_embedding(
        self, bbox_towers: list[Tensor], strides: list[int]
    ) -> tuple[Tensor, Tensor]:
        """Proposal embeddings q and margins m at every FCOS location.

        Args:
            bbox_towers: per level [B, C, H_l, W_l] FCOS box-tower outputs.
            strides: per level stride.

        Returns:
            (embed [B, L, D], margin [B, L, D]) with L = sum_l H_l * W_l (level-major, row-major,
            as :func:`embedmask.fcos.cat_levels`); margins are precisions m > 0.
        """
        embeds, margins = [], []
        for level, (tower, stride) in enumerate(zip(bbox_towers, strides)):
            h, w = tower.shape[-2:]
            locations = compute_locations(h, w, stride, tower.device).to(tower.dtype)
            spatial = self.proposal_spatial_embed_pred(tower) + self._position(locations, h, w)
            embed = torch.cat([spatial, self.proposal_other_embed_pred(tower)], dim=1)
            raw = self.proposal_margin_pred(tower / self.margin_reduce_factor)
            if self.margin_per_dim:
                raw = torch.cat(
                    [self.margin_scales[level](raw[:, :SPATIAL_DIMS]), raw[:, SPATIAL_DIMS:]], 1
                )
            else:
                raw = raw.expand(-1, self.embed_dim, -1, -1)
            margin = raw.exp()
            if self.fix_margin:
                margin = torch.full_like(margin, self.prior_precision) + 0 * margin
            embeds.append(embed.flatten(2))
            margins.append(margin.flatten(2))
        return torch.cat(embeds, 2).transpose(1, 2), torch.cat(margins, 2).transpose(1, 2)
