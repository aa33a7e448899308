#pragma once
// Loops of the CPU cosine pass (IFVD's map), compiled per CPU capability in
// pixel_centroid_cosine.cpp. Features are one image's [C, HW] rows, centroids its [K, C] block;
// slot[p] is pixel p's class (-1 ignored).
#include <ATen/OpMathType.h>

#include <cstdint>

#include "../dispatch.h"

namespace idd_ops {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct CosineLoops {
  // For the n pixels at f[c * HW + p]: dot[p] += f * cent[slot[p] * C + c] (nothing where
  // ignored) and nf[p] += f * f, over all channels c.
  void (*tile_sums)(const scalar_t* f, int64_t C, int64_t HW, int64_t n, const int32_t* slot, const acc_t* cent,
                    acc_t* dot, acc_t* nf);
  // One channel row x [HW] of the backward: grad[p] = a[p] * c_y + bf[p] * x[p] with
  // c_y = cent[slot[p] * C] (0 where ignored), and sums[slot[p]] += a[p] * x[p].
  void (*backward_row)(const scalar_t* x, int64_t HW, const int32_t* slot, const acc_t* a, const acc_t* bf,
                       const acc_t* cent, int64_t C, scalar_t* grad, acc_t* sums);
};

IDD_DECLARE_CPU_KERNEL(template <typename scalar_t> CosineLoops<scalar_t> cosine_loops())

}  // namespace idd_ops
