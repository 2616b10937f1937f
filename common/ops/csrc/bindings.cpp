// Python bindings of QuerySeg's compiled ops (one extension: common._C, or a JIT-built copy).
#include <torch/extension.h>

#include <vector>

#include "ms_deform_attn.h"

namespace queryseg {
namespace {

void check_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
      "sampling_locations must be (N, Lq, M, L, P, 2), got ",
      sampling_locations.sizes());
  TORCH_CHECK(
      attention_weights.dim() == 5, "attention_weights must be (N, Lq, M, L, P), got ",
      attention_weights.sizes());
  const int64_t N = value.size(0);
  const int64_t M = value.size(2);
  const int64_t L = sampling_locations.size(3);
  TORCH_CHECK(
      sampling_locations.size(0) == N && sampling_locations.size(2) == M,
      "sampling_locations ", sampling_locations.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(
      attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
      "attention_weights ", attention_weights.sizes(), " does not match sampling_locations ",
      sampling_locations.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
      "spatial_shapes must be (L, 2) with L = ", L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == L,
      "level_start_index must be (L,), got ", level_start_index.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(
      sampling_locations.scalar_type() == value.scalar_type() &&
          attention_weights.scalar_type() == value.scalar_type(),
      "value, sampling_locations and attention_weights must share a dtype, got ",
      value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
      attention_weights.scalar_type());
  for (const at::Tensor* t :
       {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: every input must be contiguous");
    TORCH_CHECK(
        t->device() == value.device(), "ms_deform_attn: every input must be on ", value.device(),
        ", got ", t->device());
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const int64_t N = value.size(0);
  const int64_t M = value.size(2);
  const int64_t D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  at::Tensor output = at::zeros({N, Lq, M, D}, value.options());
  if (output.numel() == 0) {
    return output.view({N, Lq, M * D});
  }
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    ms_deform_attn_forward_cuda(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output);
#else
    TORCH_CHECK(false, "ms_deform_attn: this build of the extension has no CUDA support");
#endif
  } else {
    ms_deform_attn_forward_cpu(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output);
  }
  return output.view({N, Lq, M * D});
}

std::vector<at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const int64_t N = value.size(0);
  const int64_t M = value.size(2);
  const int64_t D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  TORCH_CHECK(
      grad_output.numel() == N * Lq * M * D && grad_output.is_contiguous() &&
          grad_output.scalar_type() == value.scalar_type() &&
          grad_output.device() == value.device(),
      "grad_output must be a contiguous (N, Lq, M * D) tensor like value");
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  if (grad_output.numel() == 0 || value.numel() == 0) {
    return {grad_value, grad_loc, grad_attn};
  }
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    ms_deform_attn_backward_cuda(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output, grad_value, grad_loc, grad_attn);
#else
    TORCH_CHECK(false, "ms_deform_attn: this build of the extension has no CUDA support");
#endif
  } else {
    ms_deform_attn_backward_cpu(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output, grad_value, grad_loc, grad_attn);
  }
  return {grad_value, grad_loc, grad_attn};
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace queryseg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "QuerySeg compiled ops: multi-scale deformable attention (CPU, and CUDA if built).";
  m.def(
      "ms_deform_attn_forward", &queryseg::ms_deform_attn_forward,
      "Multi-scale deformable attention forward: (value, spatial_shapes, level_start_index, "
      "sampling_locations, attention_weights) -> (N, Lq, M * D)");
  m.def(
      "ms_deform_attn_backward", &queryseg::ms_deform_attn_backward,
      "Multi-scale deformable attention backward: (..., grad_output) -> "
      "[grad_value, grad_sampling_locations, grad_attention_weights]");
  m.def("with_cuda", &queryseg::with_cuda, "Whether the extension was compiled with CUDA kernels");
}
