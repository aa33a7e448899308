#pragma once
// Argument checks of _ifvd_maps and _ifvd_loss (IFVD's two maps, and its loss, from both networks'
// class sums), shared by their composite kernels (csrc/composite/ifvd_maps.cpp) and CUDA kernels
// (csrc/cuda/ifvd_maps_cuda.cu).
#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "class_means.h"  // check_float64_sums

namespace idd_ops {

// sums [B, K, C] float64, the class sums of feats [B, C, H, W], on feats' device.
inline void check_sums_of(const at::Tensor& sums, const char* name, int64_t K, const at::Tensor& feats,
                          const char* feats_name) {
  check_float64_sums(sums, name);
  check_size(sums, name, {feats.size(0), K, feats.size(1)}, "[B, K, C], the class sums of its network's features");
  check_same_device(sums, name, feats, feats_name);
}

inline void check_ifvd_maps_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                   const at::Tensor& student_sums, const at::Tensor& teacher_sums,
                                   const at::Tensor& counts, const at::Tensor& slots, double eps) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{student, "student"}, {teacher, "teacher"}}) {
    check_rank(t, name, 4, "[B, C, H, W]");
    check_floating(t, name);
  }
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "teacher: expected the student's dtype ",
                   student.scalar_type(), ", got ", teacher.scalar_type());
  const int64_t B = student.size(0), H = student.size(2), W = student.size(3);
  TORCH_CHECK_VALUE(teacher.size(0) == B && teacher.size(2) == H && teacher.size(3) == W,
                    "teacher: expected the student's batch and map size [", B, ", C, ", H, ", ", W, "], got ",
                    teacher.sizes());
  check_same_device(teacher, "teacher", student, "student");
  check_rank(student_sums, "student_sums", 3, "[B, K, C]");
  const int64_t K = student_sums.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxSlotClasses, "student_sums: expected 1 to ", kMaxSlotClasses,
                    " classes, got shape ", student_sums.sizes());
  check_sums_of(student_sums, "student_sums", K, student, "student");
  check_sums_of(teacher_sums, "teacher_sums", K, teacher, "teacher");
  check_counts(counts, "counts", B, K, student, "student");
  check_slots(slots, B, student, "student");
  check_size(slots, "slots", {B, H, W}, "one class slot per feature pixel");
  check_eps(eps);
}

// _pixel_centroid_cosine_slots_backward's signature, which the composite _ifvd_loss_backward
// calls through the dispatcher, feeding it the loss's gradient map (CUDA's calls its kernels
// directly: csrc/cuda/cosine_slots_backward.cuh).
using CosineSlotsBackward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double, const std::optional<at::Tensor>&);

// _ifvd_loss's factor: 1 / (B * H * W) for the mean (1 without pixels, whose sum is 0), else 1.
inline double ifvd_loss_factor(const at::Tensor& cos_student, bool mean) {
  return mean ? 1.0 / static_cast<double>(std::max<int64_t>(cos_student.numel(), 1)) : 1.0;
}

// The backward's arguments: a reduced loss's one gradient value; the forward's maps of student,
// the teacher's cosines among them; the forward's table [B, C, K] and norms [B, K] of the student's
// centroids, in the accumulation dtype (they are read raw, as it wrote them); then the slot-map
// cosine backward's checks, the table's transpose standing for its centroids [B, K, C] and the
// student's map for the gradient map (its shape and dtype), which the backward forms from the maps.
inline void check_ifvd_loss_backward_inputs(const at::Tensor& grad, const at::Tensor& student,
                                            const at::Tensor& student_table, const at::Tensor& student_norms,
                                            const at::Tensor& slots, const at::Tensor& cos_student,
                                            const at::Tensor& cos_teacher, const at::Tensor& feat_norms,
                                            const at::Tensor& counts, double eps) {
  check_loss_grad(grad, student, "student", Reduction::Mean, {});
  check_rank(student, "student", 4, "[B, C, H, W]");
  check_floating(student, "student");
  const int64_t B = student.size(0), C = student.size(1);
  const std::array<int64_t, 3> map{B, student.size(2), student.size(3)};
  const auto acc = acc_dtype(student.scalar_type());
  check_rank(student_table, "student_table", 3, "[B, C, K]");
  TORCH_CHECK_VALUE(student_table.size(0) == B && student_table.size(1) == C && student_table.size(2) >= 1,
                    "student_table: expected [B, C, K] = [", B, ", ", C,
                    ", K] with K >= 1 (the forward's output), got ", student_table.sizes());
  const int64_t K = student_table.size(2);
  check_size(student_norms, "student_norms", {B, K}, "[B, K], a norm per centroid of student_table");
  const auto check_output = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == acc, name, ": expected ", acc, " (the forward's output), got ",
                     t.scalar_type());
    check_same_device(t, name, student, "student");
  };
  check_output(student_table, "student_table");
  check_output(student_norms, "student_norms");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos_student, "cos_student"},
                                {cos_teacher, "cos_teacher"},
                                {feat_norms, "feat_norms"}}) {
    check_size(t, name, map, "[B, H, W], one per pixel of student");
    check_output(t, name);
  }
  check_pixel_centroid_cosine_slots_backward_inputs(cos_student, student, student_table.transpose(1, 2), slots,
                                                    cos_student, feat_norms, eps, counts);
}

}  // namespace idd_ops
