// Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), QuerySeg's own kernels.
//
// Shapes (all tensors contiguous, value/sampling_locations/attention_weights of one dtype):
//   value               (N, S, M, D)        S = sum_l H_l * W_l
//   spatial_shapes      (L, 2)   int64      (H_l, W_l)
//   level_start_index   (L,)     int64      offset of level l inside S
//   sampling_locations  (N, Lq, M, L, P, 2) normalised (x, y); 0 and 1 are the outer edges of the map
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
// Sampling follows grid_sample(bilinear, padding_mode="zeros", align_corners=False).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace queryseg {

// Entry points used by the Python binding; they dispatch on value.is_cuda().
at::Tensor ms_deform_attn_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Returns {grad_value (N,S,M,D), grad_sampling_locations (N,Lq,M,L,P,2),
// grad_attention_weights (N,Lq,M,L,P)}; grad_output is (N, Lq, M * D).
std::vector<at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// CPU kernels: write into preallocated, zero-filled outputs.
void ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    at::Tensor& output);

void ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    at::Tensor& grad_value,
    at::Tensor& grad_sampling_locations,
    at::Tensor& grad_attention_weights);

#ifdef WITH_CUDA
// CUDA kernels: same contract as the CPU ones; launch errors raise (C10_CUDA_KERNEL_LAUNCH_CHECK).
void ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    at::Tensor& output);

void ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    at::Tensor& grad_value,
    at::Tensor& grad_sampling_locations,
    at::Tensor& grad_attention_weights);
#endif

}  // namespace queryseg
