#pragma once
// The last step of every centroid-distance backward in ATen calls (class_distance_matrix and
// idd_tail): from W_ij, the gradient reaching the pair (i, j) through both of its entries, to
// the centroids' gradient.
#include <ATen/ATen.h>

#include "../common/enums.h"

namespace idd_ops {

// grad_c_i = sum_j W_ij (a_ij c_i + b_ij c_j) with {a, b} the metric's derivative
// d R_ij / d c_i = a_ij c_i + b_ij c_j. raw: [B, K, K] distances R (W is 0 wherever R is not a
// valid distance); norm_sq: [B, K] |c_i|^2 of the centroids c [B, K, C] (cosine only).
inline at::Tensor centroid_gradient(const at::Tensor& w, const at::Tensor& raw, const at::Tensor& norm_sq,
                                    const at::Tensor& c, Metric metric, double eps) {
  const at::Tensor zero = at::zeros({}, raw.options());
  at::Tensor a, b;
  switch (metric) {
    case Metric::Euclidean:  // (c_i - c_j) / R, defined as 0 at zero distance
      a = at::where(raw > 0, w / raw, zero);
      b = -a;
      break;
    case Metric::SqEuclidean:
      a = 2 * w;
      b = -a;
      break;
    default: {  // R = 1 - <c_i, c_j> / den; den = |c_i||c_j| unless clamped to eps (then constant)
      const at::Tensor norm_prod = (norm_sq.unsqueeze(2) * norm_sq.unsqueeze(1)).sqrt();
      a = at::where(norm_prod > eps, w * (1 - raw) / norm_sq.unsqueeze(2), zero);
      b = -w / norm_prod.clamp_min(eps);
    }
  }
  // sum_j a_ij c_i + b_ij c_j as one GEMM: the row sums of a join b on the diagonal
  return at::bmm(b + at::diag_embed(a.sum(-1)), c);
}

}  // namespace idd_ops
