#pragma once
// Argument checks of _class_means and its backward, shared by the composite kernels
// (csrc/composite/class_means.cpp) and the CUDA ones (csrc/cuda/class_means_cuda.cu), and of the
// class sums that it and _ifvd_maps (ifvd_maps.h) take.
#include "checks.h"

namespace idd_ops {

// sums [B, K, C] float64, as class_sums returns them.
inline void check_float64_sums(const at::Tensor& sums, const char* name) {
  check_rank(sums, name, 3, "[B, K, C]");
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kDouble, name,
                   ": expected float64 class sums (as class_sums returns), got ", sums.scalar_type());
}

inline void check_class_means_inputs(const at::Tensor& sums, const at::Tensor& counts, at::ScalarType dtype) {
  check_float64_sums(sums, "sums");
  check_counts(counts, "counts", sums.size(0), sums.size(1), sums, "sums");
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dtype: expected a floating dtype, got ", dtype);
}

inline void check_class_means_backward_inputs(const at::Tensor& grad, const at::Tensor& counts) {
  check_rank(grad, "grad", 3, "[B, K, C]");
  check_floating(grad, "grad");
  check_counts(counts, "counts", grad.size(0), grad.size(1), grad, "grad");
}

}  // namespace idd_ops
