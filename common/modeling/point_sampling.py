"""PointRend-style point sampling shared by the matcher costs and the point-sampled mask losses.

Follows ``detectron2.projects.point_rend.point_features`` (``point_sample`` and
``get_uncertain_point_coords_with_randomness``, as Mask2Former and FastInst call them). Differences:
an optional ``torch.Generator`` for reproducible draws, and no import of the PointRend package
(whose ``__init__`` registers ROI heads).

Coordinates are normalised ``(x, y)`` in ``[0, 1] x [0, 1]``; sampling is bilinear with
``align_corners=False``, i.e. (0, 0) is the top-left corner of the top-left pixel.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "point_sample",
    "sample_channels_at_points",
    "uniform_point_coords",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
]


def point_sample(input: Tensor, point_coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly sample ``input`` at normalised points (a wrapper of ``F.grid_sample``).

    Args:
        input: [N, C, H, W] feature maps.
        point_coords: [N, P, 2] or [N, Hg, Wg, 2] normalised ``(x, y)`` in [0, 1].
        align_corners: passed to ``grid_sample``; PointRend, Mask2Former and FastInst use False.

    Returns:
        [N, C, P] (3-d ``point_coords``) or [N, C, Hg, Wg] (4-d), dtype of ``input``.
        Points outside the map read zeros (``padding_mode="zeros"``).
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    grid = 2.0 * point_coords.to(input.dtype) - 1.0
    output = F.grid_sample(input, grid, mode="bilinear", align_corners=align_corners)
    return output.squeeze(3) if add_dim else output


def sample_channels_at_points(masks: Tensor, point_coords: Tensor) -> Tensor:
    """Sample M maps at the SAME P points by treating them as channels of one image.

    This is the memory trick of the FastInst matcher: one [1, M, H, W] grid_sample instead of M
    single-channel images with M copies of the point grid. Values equal
    ``point_sample(masks[:, None], point_coords[None].expand(M, -1, -1))[:, 0]``.

    Args:
        masks: [M, H, W] maps (any float dtype; bool/uint8 are converted to float).
        point_coords: [P, 2] normalised ``(x, y)``.

    Returns:
        [M, P] sampled values.
    """
    if not masks.is_floating_point():
        masks = masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, point_coords.shape[0]))
    return point_sample(masks[None], point_coords[None])[0]


def uniform_point_coords(
    num_points: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    batch: int | None = None,
) -> Tensor:
    """Draw uniform random normalised points.

    Returns:
        [num_points, 2] if ``batch`` is None else [batch, num_points, 2], float32 on ``device``.
    """
    shape = (num_points, 2) if batch is None else (batch, num_points, 2)
    if generator is not None and generator.device.type != torch.device(device).type:
        pts = torch.rand(shape, generator=generator, device=generator.device)
        return pts.to(device)
    return torch.rand(shape, generator=generator, device=device)


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of class-agnostic mask logits: ``-|logit|`` (higher = less certain).

    Args:
        logits: [R, 1, ...] logits.

    Returns:
        Same shape as ``logits``.
    """
    assert logits.shape[1] == 1, "class-agnostic logits expected: [R, 1, ...]"
    return -(logits.clone().abs())


def get_uncertain_point_coords_with_randomness(
    coarse_logits: Tensor,
    uncertainty_func: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend importance sampling (training): oversample, keep the most uncertain, add random.

    Draws ``int(num_points * oversample_ratio)`` uniform candidates per map, keeps the
    ``int(importance_sample_ratio * num_points)`` with highest uncertainty (computed on the
    *sampled* logits) and fills the rest with fresh uniform points.

    Args:
        coarse_logits: [R, 1, h, w] mask logits (detach them; no gradient is needed here).
        uncertainty_func: maps [R, 1, P] logits to [R, 1, P] uncertainties.
        num_points: P, points per map.
        oversample_ratio: >= 1 (Mask2Former/FastInst: 3.0).
        importance_sample_ratio: in [0, 1] (Mask2Former/FastInst: 0.75).
        generator: optional RNG for the uniform draws.

    Returns:
        [R, P, 2] normalised ``(x, y)`` coordinates.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    num_maps = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    coords = uniform_point_coords(num_sampled, device, generator, batch=num_maps)
    point_logits = point_sample(coarse_logits, coords)
    uncertainties = uncertainty_func(point_logits)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]
    coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        rand = uniform_point_coords(num_random, device, generator, batch=num_maps)
        coords = torch.cat([coords, rand], dim=1)
    return coords
