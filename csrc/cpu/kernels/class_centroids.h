#pragma once
// Loop of the CPU centroid pass, compiled per CPU capability in class_centroids.cpp.
#include <ATen/OpMathType.h>

#include <cstdint>

#include "../dispatch.h"

namespace idd_ops {

// sums[cls[r]] += x[start[r]] + ... + x[start[r + 1] - 1] for every run r < runs with
// cls[r] >= 0 (the label runs of one image, see label_runs.h), accumulated in acc_t.
IDD_DECLARE_CPU_KERNEL(template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>> void add_run_sums(
    const scalar_t* x, const int64_t* start, const int64_t* cls, int64_t runs, acc_t* sums))

}  // namespace idd_ops
