// CPU kernels of multi-scale deformable attention (see ms_deform_attn.h for shapes).
//
// Forward is parallel over (batch, query); backward is parallel over (batch, head), so every
// thread owns a disjoint slice of grad_value and no atomics are needed (the result is
// deterministic). The innermost loops run over the D contiguous channels of one head.
#include "ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "bilinear.h"

// Vectorise the channel loops (a reduction needs the explicit pragma without -ffast-math).
#ifdef _OPENMP
#define QS_SIMD _Pragma("omp simd")
#define QS_SIMD_SUM(var) _Pragma(QS_STRINGIFY(omp simd reduction(+ : var)))
#define QS_STRINGIFY(x) #x
#else
#define QS_SIMD
#define QS_SIMD_SUM(var)
#endif

namespace queryseg {
namespace {

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

template <typename scalar_t>
void forward_kernel(
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* level_start,
    const scalar_t* loc,
    const scalar_t* attn,
    scalar_t* out,
    const Dims d) {
  const int64_t pos_stride = d.M * d.D;  // elements between two spatial positions in `value`
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d.M * d.L * d.P));
  at::parallel_for(0, d.N * d.Lq, grain, [&](int64_t begin, int64_t end) {
    BilinearCorners<scalar_t> c;
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / d.Lq;
      for (int64_t m = 0; m < d.M; ++m) {
        scalar_t* o = out + (bq * d.M + m) * d.D;
        const int64_t item = (bq * d.M + m) * d.L * d.P;  // index of (b, q, m, l=0, p=0)
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t H = shapes[2 * l];
          const int64_t W = shapes[2 * l + 1];
          const scalar_t* base = value + ((b * d.S + level_start[l]) * d.M + m) * d.D;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t idx = item + l * d.P + p;
            const scalar_t x = loc[2 * idx];
            const scalar_t y = loc[2 * idx + 1];
            const scalar_t a = attn[idx];
            if (!bilinear_corners<scalar_t>(y * H - scalar_t(0.5), x * W - scalar_t(0.5), H, W, c)) {
              if (point_is_nan(x, y, a)) {  // as grid_sample: NaN, not a silent zero
                const scalar_t nan = quiet_nan<scalar_t>();
                for (int64_t ch = 0; ch < d.D; ++ch) {
                  o[ch] += nan;
                }
              }
              continue;
            }
            for (int k = 0; k < 4; ++k) {
              if (c.index[k] < 0) {
                continue;
              }
              const scalar_t coef = a * c.weight[k];
              const scalar_t* v = base + c.index[k] * pos_stride;
              QS_SIMD
              for (int64_t ch = 0; ch < d.D; ++ch) {
                o[ch] += coef * v[ch];
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* level_start,
    const scalar_t* loc,
    const scalar_t* attn,
    const scalar_t* grad_out,
    scalar_t* grad_value,
    scalar_t* grad_loc,
    scalar_t* grad_attn,
    const Dims d) {
  const int64_t pos_stride = d.M * d.D;
  at::parallel_for(0, d.N * d.M, 1, [&](int64_t begin, int64_t end) {
    BilinearCorners<scalar_t> c;
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / d.M;
      const int64_t m = bm % d.M;
      for (int64_t q = 0; q < d.Lq; ++q) {
        const int64_t bq = b * d.Lq + q;
        const scalar_t* g = grad_out + (bq * d.M + m) * d.D;
        const int64_t item = (bq * d.M + m) * d.L * d.P;
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t H = shapes[2 * l];
          const int64_t W = shapes[2 * l + 1];
          const int64_t level_offset = ((b * d.S + level_start[l]) * d.M + m) * d.D;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t idx = item + l * d.P + p;
            const scalar_t x = loc[2 * idx];
            const scalar_t y = loc[2 * idx + 1];
            const scalar_t a = attn[idx];
            if (!bilinear_corners<scalar_t>(y * H - scalar_t(0.5), x * W - scalar_t(0.5), H, W, c)) {
              if (!(is_finite(x) && is_finite(y))) {  // NaN gradients, as grid_sample's
                grad_attn[idx] = quiet_nan<scalar_t>();
                grad_loc[2 * idx] = quiet_nan<scalar_t>();
                grad_loc[2 * idx + 1] = quiet_nan<scalar_t>();
              }
              continue;  // otherwise gradients stay zero
            }
            scalar_t g_attn = 0;
            scalar_t g_h = 0;
            scalar_t g_w = 0;
            for (int k = 0; k < 4; ++k) {
              if (c.index[k] < 0) {
                continue;
              }
              const int64_t off = level_offset + c.index[k] * pos_stride;
              const scalar_t* v = value + off;
              scalar_t* gv = grad_value + off;
              const scalar_t coef = a * c.weight[k];
              scalar_t dot = 0;
              QS_SIMD_SUM(dot)
              for (int64_t ch = 0; ch < d.D; ++ch) {
                dot += g[ch] * v[ch];
                gv[ch] += coef * g[ch];
              }
              g_attn += c.weight[k] * dot;
              g_h += c.dweight_dh[k] * dot;
              g_w += c.dweight_dw[k] * dot;
            }
            grad_attn[idx] = g_attn;
            grad_loc[2 * idx] = a * g_w * scalar_t(W);
            grad_loc[2 * idx + 1] = a * g_h * scalar_t(H);
          }
        }
      }
    }
  });
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

}  // namespace

void ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    at::Tensor& output) {
  const Dims d = dims_of(value, sampling_locations);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(),
        spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(),
        output.data_ptr<scalar_t>(),
        d);
  });
}

void ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    at::Tensor& grad_value,
    at::Tensor& grad_sampling_locations,
    at::Tensor& grad_attention_weights) {
  const Dims d = dims_of(value, sampling_locations);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
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
  });
}

}  // namespace queryseg
