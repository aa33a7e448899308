#pragma once
// The IDD loss over pairs of classes, shared by the CPU and CUDA kernels: which pairs
// count, and how per-image sums become the reduced loss (host side, plain ATen, so both
// devices reduce identically and without a host sync).
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "enums.h"

namespace idd_ops {

// Pair (i, j), i < j, of one image is valid when both classes are present for the student
// and for the teacher; cs and ct are that image's counts.
C10_HOST_DEVICE inline bool idd_pair_valid(const int64_t* cs, const int64_t* ct, int64_t i, int64_t j) {
  return i < j && cs[i] > 0 && cs[j] > 0 && ct[i] > 0 && ct[j] > 0;
}

// The loss from per-image sums of squared differences [B] and valid-pair counts [B].
inline at::Tensor idd_reduce(const at::Tensor& sums, const at::Tensor& n_valid, Reduction reduction) {
  const at::Tensor n = n_valid.to(sums.scalar_type());
  switch (reduction) {
    case Reduction::Sum:
      return sums.sum();
    case Reduction::None:
      return sums / n.clamp_min(1);
    default:
      return sums.sum() / n.sum().clamp_min(1);
  }
}

// d loss / d (per-image sum) for each image, [B], from the loss's incoming gradient.
inline at::Tensor idd_image_scale(const at::Tensor& grad, const at::Tensor& n_valid, Reduction reduction,
                                  int64_t batch) {
  const at::Tensor n = n_valid.to(grad.scalar_type());
  switch (reduction) {
    case Reduction::Sum:
      return grad.expand({batch}).contiguous();
    case Reduction::None:
      return grad / n.clamp_min(1);
    default:
      return (grad / n.sum().clamp_min(1)).expand({batch}).contiguous();
  }
}

}  // namespace idd_ops
