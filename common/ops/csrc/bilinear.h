// Bilinear sampling helper shared by the CPU and CUDA multi-scale deformable attention kernels.
//
// Convention (grid_sample, align_corners=False, zero padding): a normalised coordinate u in [0, 1]
// maps to the pixel coordinate u * size - 0.5, corners outside the map contribute zero, and a point
// with h <= -1, w <= -1, h >= H or w >= W has no corner inside the map at all.
//
// Non-finite inputs behave as in grid_sample: a NaN/Inf sampling location (bilinear_corners
// returns false for it) or a NaN/Inf attention weight of a point outside the map contributes NaN
// (grid_sample gives NaN, or 0 * NaN), so a diverging model's loss turns NaN and the trainer's
// non-finite-loss check fires; see point_is_nan.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QS_HOST_DEVICE inline
#endif

namespace queryseg {

template <typename scalar_t>
struct BilinearCorners {
  // Spatial index (h * W + w) of the four corners (h0w0, h0w1, h1w0, h1w1); -1 when outside.
  int64_t index[4];
  // Interpolation weight of each corner.
  scalar_t weight[4];
  // Derivative of each weight with respect to the pixel coordinates h and w.
  scalar_t dweight_dh[4];
  scalar_t dweight_dw[4];
};

// True for a finite value (false for NaN and +-Inf), without the math library: v - v is 0 only
// for finite v. Needs IEEE semantics (no -ffast-math / --use_fast_math).
template <typename scalar_t>
QS_HOST_DEVICE bool is_finite(scalar_t v) {
  return v - v == scalar_t(0);
}

// For a point that bilinear_corners rejected: true when grid_sample would make its contribution
// NaN (a non-finite coordinate, or a non-finite attention weight times the zero it samples).
template <typename scalar_t>
QS_HOST_DEVICE bool point_is_nan(scalar_t x, scalar_t y, scalar_t attn) {
  return !(is_finite(x) && is_finite(y) && is_finite(attn));
}

template <typename scalar_t>
QS_HOST_DEVICE scalar_t quiet_nan() {
  return static_cast<scalar_t>(NAN);
}

// Fills `c` for pixel coordinates (h, w) on an H x W map; returns false when no corner is inside.
template <typename scalar_t>
QS_HOST_DEVICE bool bilinear_corners(
    scalar_t h, scalar_t w, int64_t H, int64_t W, BilinearCorners<scalar_t>& c) {
  if (!(h > scalar_t(-1) && w > scalar_t(-1) && h < scalar_t(H) && w < scalar_t(W))) {
    return false;
  }
  // floor() without the math library: h, w > -1 here.
  const int64_t h0 = h >= scalar_t(0) ? static_cast<int64_t>(h) : int64_t(-1);
  const int64_t w0 = w >= scalar_t(0) ? static_cast<int64_t>(w) : int64_t(-1);
  const int64_t h1 = h0 + 1;
  const int64_t w1 = w0 + 1;
  const scalar_t lh = h - scalar_t(h0);
  const scalar_t lw = w - scalar_t(w0);
  const scalar_t hh = scalar_t(1) - lh;
  const scalar_t hw = scalar_t(1) - lw;
  const bool in_h0 = h0 >= 0;
  const bool in_w0 = w0 >= 0;
  const bool in_h1 = h1 <= H - 1;
  const bool in_w1 = w1 <= W - 1;
  c.index[0] = (in_h0 && in_w0) ? h0 * W + w0 : -1;
  c.index[1] = (in_h0 && in_w1) ? h0 * W + w1 : -1;
  c.index[2] = (in_h1 && in_w0) ? h1 * W + w0 : -1;
  c.index[3] = (in_h1 && in_w1) ? h1 * W + w1 : -1;
  c.weight[0] = hh * hw;
  c.weight[1] = hh * lw;
  c.weight[2] = lh * hw;
  c.weight[3] = lh * lw;
  c.dweight_dh[0] = -hw;
  c.dweight_dh[1] = -lw;
  c.dweight_dh[2] = hw;
  c.dweight_dh[3] = lw;
  c.dweight_dw[0] = -hh;
  c.dweight_dw[1] = hh;
  c.dweight_dw[2] = -lh;
  c.dweight_dw[3] = lh;
  return true;
}

}  // namespace queryseg
