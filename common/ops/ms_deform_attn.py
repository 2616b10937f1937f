"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021).

``ms_deform_attn`` is the op, with three implementations behind one signature:

- ``ms_deform_attn_pytorch``: pure PyTorch (``F.grid_sample``), the reference and the fallback.
- the compiled CPU kernel (``common/ops/csrc``), used for CPU tensors when the extension is built:
  it is faster than the PyTorch path on CPU (``tools/bench_ops.py``) and deterministic.
- the compiled CUDA kernel, used for CUDA tensors when the extension was built with CUDA.

Follows Mask2Former's copy of the Deformable-DETR op, but: our own kernels on current ATen APIs,
float16/bfloat16 inputs are computed in float32 and cast back (the original raises), there is no
``im2col_step``, a device/dtype check instead of a bare ``except`` picks the implementation, and
launch errors raise. The CUDA backward scatters ``grad_value`` with atomics (not bit-wise
deterministic), as does ``grid_sample``'s backward on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .build import compiled_ops

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "MSDeformAttnFunction", "MSDeformAttn"]

# Measured with tools/bench_ops.py (batch 2, 8400 queries, 8 heads, 3 levels, 4 points, 256 dims):
# the compiled CPU kernel beats the grid_sample path on CPU, so "auto" prefers it when it is built.
CPU_KERNEL_PREFERRED = True

_IMPLS = ("auto", "pytorch", "compiled")


def _shapes_list(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention via ``F.grid_sample`` (bilinear, zero padding).

    Args:
        value: (N, S, M, D) values of all levels, flattened; S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 tensor or L pairs: (H_l, W_l) of each level, in order.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); 0 and 1 are the outer edges.
        attention_weights: (N, Lq, M, L, P) weights (already normalised by the caller).

    Returns:
        (N, Lq, M * D), the attention-weighted sum of the sampled values, dtype of ``value``.
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = _shapes_list(spatial_shapes)
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L, P)
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled = F.grid_sample(
            v, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (N*M, D, Lq, P)
        term = (sampled * weights[:, :, :, lvl]).sum(-1)  # (N*M, D, Lq)
        out = term if out is None else out + term
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled op; inputs must be contiguous, float32/float64, one device.

    ``apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``
    with the shapes of ``ms_deform_attn``; returns (N, Lq, M * D).
    """

    @staticmethod
    def forward(
        ctx,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        ext = compiled_ops()
        if ext is None:
            raise RuntimeError("QuerySeg's compiled ops are not built (see common/ops/build.py)")
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return ext.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = compiled_ops().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, locations, weights, grad_output.contiguous()
        )
        return grad_value, None, None, grad_locations, grad_weights


def _use_compiled(value: Tensor, impl: str) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "pytorch":
        return False
    if impl == "auto" and (torch.jit.is_tracing() or torch.jit.is_scripting()):
        return False  # export (ONNX / TorchScript) traces the PyTorch path: standard operators
    ext = compiled_ops()
    on_cuda = value.device.type == "cuda"
    if impl == "compiled":
        if ext is None:
            raise RuntimeError("impl='compiled' but QuerySeg's compiled ops are not built")
        if on_cuda and not ext.with_cuda():
            raise RuntimeError("impl='compiled' on CUDA but the ops were built without CUDA")
        if not on_cuda and value.device.type != "cpu":
            raise RuntimeError(f"no compiled kernel for device {value.device}")
        return True
    if ext is None:
        return False
    if on_cuda:
        return bool(ext.with_cuda())
    return value.device.type == "cpu" and CPU_KERNEL_PREFERRED


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention: sample each level bilinearly and sum with the weights.

    Args:
        value: (N, S, M, D) values of all levels, flattened; S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each level.
        level_start_index: (L,) int64, offset of level l inside S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1] (outside allowed:
            such samples read zeros).
        attention_weights: (N, Lq, M, L, P).
        impl: "auto" (compiled kernel when built and the device has one, else PyTorch),
            "pytorch" or "compiled" (raise when unavailable).

    Returns:
        (N, Lq, M * D) in ``value``'s dtype. float16/bfloat16 inputs are computed in float32
        (float64 if any input is float64), with autocast off, and cast back.
    """
    out_dtype = value.dtype
    inputs = (value, sampling_locations, attention_weights)
    compute_dtype = (
        torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    )
    with torch.autocast(device_type=value.device.type, enabled=False):
        value, sampling_locations, attention_weights = (t.to(compute_dtype) for t in inputs)
        if _use_compiled(value, impl):
            device = value.device
            out = MSDeformAttnFunction.apply(
                value.contiguous(),
                spatial_shapes.to(device=device, dtype=torch.long).contiguous(),
                level_start_index.to(device=device, dtype=torch.long).contiguous(),
                sampling_locations.contiguous(),
                attention_weights.contiguous(),
            )
        else:
            out = ms_deform_attn_pytorch(
                value, spatial_shapes, sampling_locations, attention_weights
            )
    return out.to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR; Mask2Former's initialisation).

    Sampling offsets and attention weights are computed in float32 even under autocast, so that
    the sampling locations keep their precision; value and output projections follow autocast.
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4
    ) -> None:
        """
        Args:
            d_model: channels C of queries and values; must be divisible by ``n_heads``.
            n_levels: feature levels L.
            n_heads: attention heads M.
            n_points: sampling points P per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.impl = "auto"  # see ms_deform_attn
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head h starts looking in direction 2*pi*h/M, point p at distance p + 1 (in pixels).
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalised (x, y) points, or (N, Lq, L, 4) boxes
                (cx, cy, w, h) whose size scales the offsets.
            input_flatten: (N, S, C) values of all levels, flattened.
            input_spatial_shapes: (L, 2) int64, (H_l, W_l).
            input_level_start_index: (L,) int64.
            input_padding_mask: (N, S) bool, True at padding (those values are zeroed), or None.

        Returns:
            (N, Lq, C).
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).float().view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).float().view(N, Lq, M, L * P)
        weights = weights.softmax(-1).view(N, Lq, M, L, P)
        ref = reference_points.float()
        if ref.shape[-1] == 2:
            wh = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = (
                ref[:, :, None, :, None, :] + offsets / wh.to(offsets)[None, None, None, :, None]
            )
        elif ref.shape[-1] == 4:
            locations = (
                ref[:, :, None, :, None, :2] + offsets / P * ref[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(ref.shape)}")
        out = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, weights, impl=self.impl
        )
        return self.output_proj(out)
