// CUDA kernels of multi-scale deformable attention (see ms_deform_attn.h for shapes).
//
// One warp handles one (batch, query, head) item; its lanes walk the D channels of that head, so
// reads of `value` are coalesced and the per-point reductions of the backward pass (gradients of
// the sampling location and of the attention weight) are warp shuffles, written once by lane 0
// with no atomics. grad_value is scattered with atomicAdd, so it is not bit-wise deterministic.
// float32 and float64 only; the Python side casts float16/bfloat16 to float32.
#include "ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "bilinear.h"

namespace queryseg {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 16;

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ level_start,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    scalar_t* __restrict__ out,
    const Dims d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t num_items = d.N * d.Lq * d.M;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t pos_stride = d.M * d.D;
  BilinearCorners<scalar_t> c;
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       item < num_items; item += warps_total) {
    const int64_t m = item % d.M;
    const int64_t b = item / (d.M * d.Lq);
    for (int64_t c0 = 0; c0 < d.D; c0 += kWarp) {
      const int64_t ch = c0 + lane;
      const bool active = ch < d.D;
      scalar_t acc = 0;
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t H = shapes[2 * l];
        const int64_t W = shapes[2 * l + 1];
        const scalar_t* base = value + ((b * d.S + level_start[l]) * d.M + m) * d.D + ch;
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t idx = (item * d.L + l) * d.P + p;
          const scalar_t x = loc[2 * idx];
          const scalar_t y = loc[2 * idx + 1];
          const scalar_t a = attn[idx];
          if (!active) {
            continue;
          }
          if (!bilinear_corners<scalar_t>(y * H - scalar_t(0.5), x * W - scalar_t(0.5), H, W, c)) {
            if (point_is_nan(x, y, a)) {  // as grid_sample: NaN, not a silent zero
              acc += quiet_nan<scalar_t>();
            }
            continue;
          }
          scalar_t sampled = 0;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.index[k] >= 0) {
              sampled += c.weight[k] * base[c.index[k] * pos_stride];
            }
          }
          acc += a * sampled;
        }
      }
      if (active) {
        out[item * d.D + ch] = acc;
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ level_start,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    const scalar_t* __restrict__ grad_out,
    scalar_t* __restrict__ grad_value,
    scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn,
    const Dims d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t num_items = d.N * d.Lq * d.M;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t pos_stride = d.M * d.D;
  BilinearCorners<scalar_t> c;
  // The item loop bound is uniform across a warp, so every shuffle below has all 32 lanes.
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       item < num_items; item += warps_total) {
    const int64_t m = item % d.M;
    const int64_t b = item / (d.M * d.Lq);
    const scalar_t* g = grad_out + item * d.D;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = shapes[2 * l];
      const int64_t W = shapes[2 * l + 1];
      const int64_t level_offset = ((b * d.S + level_start[l]) * d.M + m) * d.D;
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t idx = (item * d.L + l) * d.P + p;
        const scalar_t x = loc[2 * idx];
        const scalar_t y = loc[2 * idx + 1];
        const scalar_t a = attn[idx];
        if (!bilinear_corners<scalar_t>(y * H - scalar_t(0.5), x * W - scalar_t(0.5), H, W, c)) {
          // warp-uniform: every lane sees the same point; NaN gradients for a non-finite
          // location (as grid_sample's), otherwise they stay zero
          if (lane == 0 && !(is_finite(x) && is_finite(y))) {
            grad_attn[idx] = quiet_nan<scalar_t>();
            grad_loc[2 * idx] = quiet_nan<scalar_t>();
            grad_loc[2 * idx + 1] = quiet_nan<scalar_t>();
          }
          continue;
        }
        scalar_t g_attn = 0;
        scalar_t g_h = 0;
        scalar_t g_w = 0;
        for (int64_t ch = lane; ch < d.D; ch += kWarp) {
          const scalar_t go = g[ch];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.index[k] < 0) {
              continue;
            }
            const int64_t off = level_offset + c.index[k] * pos_stride + ch;
            const scalar_t dot = go * value[off];
            g_attn += c.weight[k] * dot;
            g_h += c.dweight_dh[k] * dot;
            g_w += c.dweight_dw[k] * dot;
            atomicAdd(grad_value + off, a * c.weight[k] * go);
          }
        }
        g_attn = warp_sum(g_attn);
        g_h = warp_sum(g_h);
        g_w = warp_sum(g_w);
        if (lane == 0) {
          grad_attn[idx] = g_attn;
          grad_loc[2 * idx] = a * g_w * scalar_t(W);
          grad_loc[2 * idx + 1] = a * g_h * scalar_t(H);
        }
      }
    }
  }
}

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return Dims{
      value.size(0),
      value.size(1),
      value.size(2),
      value.size(3),
      sampling_locations.size(1),
      sampling_locations.size(3),
      sampling_locations.size(4)};
}

unsigned int num_blocks(const Dims& d) {
  const int64_t items = d.N * d.Lq * d.M;
  const int64_t warps_per_block = kThreads / kWarp;
  const int64_t blocks = (items + warps_per_block - 1) / warps_per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

}  // namespace

void ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    at::Tensor& output) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dims d = dims_of(value, sampling_locations);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(d), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(),
        spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(),
        output.data_ptr<scalar_t>(),
        d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    at::Tensor& grad_value,
    at::Tensor& grad_sampling_locations,
    at::Tensor& grad_attention_weights) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dims d = dims_of(value, sampling_locations);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    backward_kernel<scalar_t><<<num_blocks(d), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(),
        spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(),
        grad_output.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(),
        grad_sampling_locations.data_ptr<scalar_t>(),
        grad_attention_weights.data_ptr<scalar_t>(),
        d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace queryseg
