"""Instance-activation-guided (IA) query proposal of FastInst (paper Sec. 3.2).

An auxiliary classification head predicts, on E4, a (C+1)-way class distribution per pixel. Each
pixel keeps only its arg-max foreground class; pixels that are 8-neighbourhood local maxima of their
class plane get +1 (a soft priority, so non-maxima still fill the slots when there are fewer
maxima than queries); the top-k pixels by that score give the queries' content (E4 features) and
positions.

Provenance: same selection as the official ``QueryProposal`` (zero-padded border, >= 1e-6
threshold, corner-aligned ``linspace`` locations) with the same parameter names; differences: the
local-maximum test is one 3x3 max-pool, locations are returned in eval too, and k is clipped to
the number of E4 pixels for tiny inputs (the official code fails there).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["local_maximum_map", "QueryProposal", "Proposals"]


def local_maximum_map(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """8-neighbourhood local maxima of every plane.

    A pixel is a maximum if its value is >= all 8 neighbours (the border is zero-padded) and
    >= ``eps``.

    Args:
        scores: [B, C, H, W] non-negative scores.
    Returns:
        [B, C, H, W] with 1.0 at maxima and 0.0 elsewhere (dtype of ``scores``).
    """
    neighbourhood_max = F.max_pool2d(F.pad(scores, (1, 1, 1, 1)), kernel_size=3, stride=1)
    return ((scores >= neighbourhood_max) & (scores >= eps)).to(scores.dtype)


def _corner_aligned_locations(h: int, w: int, device: torch.device) -> Tensor:
    """[H*W, 2] normalised (x, y) of every pixel, ``linspace(0, 1)`` per axis, row-major."""
    ys = torch.linspace(0, 1, h, device=device)
    xs = torch.linspace(0, 1, w, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


class Proposals(NamedTuple):
    """Output of :class:`QueryProposal` (K = number of selected queries)."""

    features: Tensor  #: [B, K, D] E4 features at the selected pixels (query content)
    pos: Tensor  #: [B, K, D] positional embedding at the selected pixels (query position)
    locations: Tensor  #: [B, K, 2] normalised (x, y) of the selected pixels
    indices: Tensor  #: [B, K] row-major pixel indices into the E4 map
    cls_logits: Tensor  #: [B, C+1, H, W] auxiliary (proposal) classification logits


class QueryProposal(nn.Module):
    """IA-guided query selection on E4.

    Args:
        num_features: D, channels of E4.
        num_queries: k, the number of IA queries N_a.
        num_classes: C foreground classes (the head predicts C + 1 with background last).
        local_maximum: add +1 at the 8-neighbourhood local maxima (the paper's selection);
            False: plain top-k of the arg-max class probability (its ablation).
    """

    def __init__(
        self, num_features: int, num_queries: int, num_classes: int, local_maximum: bool = True
    ):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.local_maximum = local_maximum
        self.conv_proposal_cls_logits = nn.Sequential(
            nn.Conv2d(num_features, num_features, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_features, num_classes + 1, kernel_size=1),
        )

    @torch.no_grad()
    def selection_scores(self, cls_logits: Tensor) -> Tensor:
        """Per-pixel priority: prob of the pixel's arg-max foreground class, +1 at local maxima.

        Args:
            cls_logits: [B, C+1, H, W].
        Returns:
            [B, H*W] scores; top-k of these are the IA queries.
        """
        probs = cls_logits.softmax(dim=1)[:, : self.num_classes]
        top_prob, top_cls = probs.max(dim=1, keepdim=True)
        class_planes = torch.zeros_like(probs).scatter_(1, top_cls, top_prob)
        if self.local_maximum:
            class_planes = class_planes + local_maximum_map(class_planes)
        return class_planes.amax(dim=1).flatten(1)

    def forward(self, x: Tensor, pos: Tensor) -> Proposals:
        """
        Args:
            x: [B, D, H, W] E4 features.
            pos: [B or 1, D, H, W] positional embedding at E4 resolution.
        Returns:
            :class:`Proposals` with K = min(num_queries, H*W).
        """
        b, d, h, w = x.shape
        cls_logits = self.conv_proposal_cls_logits(x)
        k = min(self.num_queries, h * w)
        indices = torch.topk(self.selection_scores(cls_logits.detach()), k, dim=1).indices
        gather_idx = indices[:, :, None].expand(-1, -1, d)
        features = torch.gather(x.flatten(2).transpose(1, 2), 1, gather_idx)
        pos = pos.expand(b, -1, -1, -1).flatten(2).transpose(1, 2)
        query_pos = torch.gather(pos, 1, gather_idx)
        locations = _corner_aligned_locations(h, w, x.device)[indices]
        return Proposals(features, query_pos, locations, indices, cls_logits)
