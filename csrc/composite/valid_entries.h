#pragma once
// The entries of a [B, K, K] class-pair matrix that hold a distance: i != j, both classes present
// in the image. Shared by class_distance_matrix and idd_tail.
#include <ATen/ATen.h>

namespace idd_ops {

// counts [B, K] (a class is present where its count is > 0) -> [B, K, K] bool.
inline at::Tensor valid_entries(const at::Tensor& counts) {
  const at::Tensor present = counts > 0;
  const at::Tensor off_diag = at::eye(counts.size(1), present.options()).logical_not();
  return present.unsqueeze(2).logical_and(present.unsqueeze(1)).logical_and(off_diag);
}

}  // namespace idd_ops
