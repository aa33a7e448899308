#pragma once
// The fused K x K tail of IDD: from per-image class sums and counts of the student and the
// teacher to the loss, in one op (idd_tail) and its backward (_idd_tail_backward).
//
// Saved tensors, shared by every implementation (so the fake kernel knows their shapes):
//   dist  [B, 2, K, K] in the tail's dtype (float32 or float64): the student's (0) and the teacher's (1) raw
//         distances R before normalisation, 0 off the valid entries; the diagonal, never a
//         valid entry, holds |c_i|^2 of the (shifted) centroids, which the cosine backward reads.
//   stats [B, K + 1, 8] float64: row K holds the image's values named by TailStat; rows 0..K-1
//         are the CUDA kernel's per-tile partial sums (TilePartial), unused by the composite.
//
// Centroids c_k = sum_k / count_k (0 where count_k = 0). For the euclidean metrics they are
// shifted by the image's first present centroid first: distances do not change, and
// |c_i|^2 + |c_j|^2 - 2 <c_i, c_j> then cancels far less (its rounding scales with the spread of
// the centroids, not with their distance from the origin), as the mean shift of
// class_distance_matrix does, at the cost of one row instead of a pass over all K.
#include <ATen/ATen.h>

#include "checks.h"

namespace idd_ops {

enum TailStat : int {
  kStatStudentDivisor = 0,  // m_s: "mean" normaliser of the student (1 without normalize)
  kStatTeacherDivisor = 1,  // m_t
  kStatPairScale = 2,       // d loss / d (image's sum of E^2) per unit of the incoming grad
  kStatKappa = 3,           // backward's shift of the pair weights through m_s (0 if m_s constant)
  kStatLossSum = 4,         // the image's sum of E^2 over its valid pairs
  kStatPairs = 5,           // the image's number of valid pairs (i < j)
  kStatQ = 6,               // sum over valid pairs of E_ij R_s,ij
  kStatStudentEntries = 7,  // number of valid student entries with i < j
  kNumStats = 8
};

enum TilePartial : int {
  kPartSumRs = 0,  // sum of R_s over valid student entries i < j
  kPartCountS = 1,
  kPartSumRt = 2,
  kPartCountT = 3,
  kPartSss = 4,  // sum of E^2 over valid pairs (normalize: filled once m_s, m_t are known)
  kPartSst = 5,  // normalize: sum of E R_s over valid pairs (Q), filled with kPartSss
  kPartStt = 6,  // unused (0)
  kPartPairs = 7
};

inline Metric metric_code(c10::string_view metric) {
  if (metric == "euclidean") return Metric::Euclidean;
  if (metric == "sqeuclidean") return Metric::SqEuclidean;
  if (metric == "cosine") return Metric::Cosine;
  TORCH_CHECK_VALUE(false, "metric: expected 'euclidean', 'sqeuclidean' or 'cosine', got '", std::string(metric), "'");
}

inline Reduction reduction_code(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction: expected 'mean', 'sum' or 'none', got '", std::string(reduction), "'");
}

// The dtype of the K x K math and dist: `dtype` (float32 or float64) or, by default, the sums'
// accumulation dtype.
inline at::ScalarType tail_dtype(const at::Tensor& sums, std::optional<at::ScalarType> dtype) {
  if (!dtype) return acc_dtype(sums.scalar_type());
  TORCH_CHECK_TYPE(*dtype == at::kFloat || *dtype == at::kDouble, "dtype: expected float32 or float64, got ", *dtype);
  return *dtype;
}

// The loss's dtype: `loss_dtype` (float32 or float64) or, by default, the K x K math's.
inline at::ScalarType tail_loss_dtype(at::ScalarType math, std::optional<at::ScalarType> loss_dtype) {
  if (!loss_dtype) return math;
  TORCH_CHECK_TYPE(*loss_dtype == at::kFloat || *loss_dtype == at::kDouble,
                   "loss_dtype: expected float32 or float64, got ", *loss_dtype);
  return *loss_dtype;
}

// sums [B, K, C] floating with counts [B, K] int64; the teacher's K and B equal the student's.
inline void check_idd_tail_inputs(const at::Tensor& student_sums, const at::Tensor& student_counts,
                                  const at::Tensor& teacher_sums, const at::Tensor& teacher_counts, double eps) {
  check_rank(student_sums, "student_sums", 3, "[B, K, Cs]");
  check_rank(teacher_sums, "teacher_sums", 3, "[B, K, Ct]");
  check_floating(student_sums, "student_sums");
  check_floating(teacher_sums, "teacher_sums");
  const int64_t B = student_sums.size(0), K = student_sums.size(1);
  TORCH_CHECK_VALUE(teacher_sums.size(0) == B && teacher_sums.size(1) == K, "teacher_sums: expected [B, K, Ct] = [",
                    B, ", ", K, ", Ct] like student_sums, got ", teacher_sums.sizes());
  check_same_device(teacher_sums, "teacher_sums", student_sums, "student_sums");
  check_counts(student_counts, "student_counts", B, K, student_sums, "student_sums");
  check_counts(teacher_counts, "teacher_counts", B, K, student_sums, "student_sums");
  check_eps(eps);
}

inline void check_idd_tail_backward_inputs(const at::Tensor& grad, const at::Tensor& student_sums,
                                           const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                                           const at::Tensor& dist, const at::Tensor& stats, double eps,
                                           Reduction reduction) {
  check_rank(student_sums, "student_sums", 3, "[B, K, Cs]");
  check_floating(student_sums, "student_sums");
  const int64_t B = student_sums.size(0), K = student_sums.size(1);
  check_counts(student_counts, "student_counts", B, K, student_sums, "student_sums");
  check_counts(teacher_counts, "teacher_counts", B, K, student_sums, "student_sums");
  check_loss_grad(grad, student_sums, "student_sums", reduction, {B});
  const std::array<int64_t, 4> dist_shape{B, 2, K, K};
  const std::array<int64_t, 3> stats_shape{B, K + 1, kNumStats};
  check_size(dist, "dist", dist_shape, "[B, 2, K, K] from idd_tail");
  check_size(stats, "stats", stats_shape, "[B, K + 1, 8] from idd_tail");
  const auto acc = dist.scalar_type();
  TORCH_CHECK_TYPE((acc == at::kFloat || acc == at::kDouble) && stats.scalar_type() == at::kDouble,
                   "dist, stats: expected float32 or float64 and float64 (idd_tail's outputs), got ", acc, " and ",
                   stats.scalar_type());
  TORCH_CHECK_VALUE(dist.is_contiguous() && stats.is_contiguous(), "dist, stats: expected idd_tail's contiguous outputs");
  check_same_device(dist, "dist", student_sums, "student_sums");
  check_same_device(stats, "stats", student_sums, "student_sums");
  check_eps(eps);
}

// The ATen implementation (csrc/composite/idd_tail.cpp): every device's math reference, what the
// CPU runs, and the CUDA path while the fused kernel is switched off.
std::tuple<at::Tensor, at::Tensor, at::Tensor> idd_tail_composite(const at::Tensor& student_sums,
                                                                  const at::Tensor& student_counts,
                                                                  const at::Tensor& teacher_sums,
                                                                  const at::Tensor& teacher_counts,
                                                                  c10::string_view metric, bool normalize, double eps,
                                                                  c10::string_view reduction,
                                                                  std::optional<at::ScalarType> dtype,
                                                                  std::optional<at::ScalarType> loss_dtype);

at::Tensor idd_tail_backward_composite(const at::Tensor& grad, const at::Tensor& student_sums,
                                       const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                                       const at::Tensor& dist, const at::Tensor& stats, c10::string_view metric,
                                       bool normalize, double eps, c10::string_view reduction);

}  // namespace idd_ops
