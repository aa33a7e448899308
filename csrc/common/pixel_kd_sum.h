#pragma once
// Argument checks of _pixel_kd_sum and its backward, shared by the composite kernels
// (csrc/composite/pixel_kd_sum.cpp) and the CUDA ones (csrc/cuda/softmax_kl_cuda.cu).
#include <optional>

#include "checks.h"

namespace idd_ops {

// student, teacher [outer, length, inner] as softmax_kl takes them; slots, where given, int16
// [outer, inner] (a _label_slots map viewed per image), contiguous.
inline void check_pixel_kd_sum_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                      const std::optional<at::Tensor>& slots, double temperature) {
  check_softmax_kl_inputs(student, teacher, temperature);
  if (!slots) return;
  TORCH_CHECK_TYPE(slots->scalar_type() == at::kShort, "slots: expected int16 (from _label_slots), got ",
                   slots->scalar_type());
  const std::array<int64_t, 2> per_pixel{student.size(0), student.size(2)};
  check_size(*slots, "slots", per_pixel, "[outer, inner], one per vector");
  check_same_device(*slots, "slots", student, "student");
}

// The factor of _pixel_kd_sum (0-dim float64): T^2 / max(kept pixels, 1) where `mean`, else T^2;
// the kept pixels are those whose slot is >= 0, every one of `pixels` without slots.
inline at::Tensor pixel_kd_sum_factor(const std::optional<at::Tensor>& slots, int64_t pixels, double temperature,
                                      bool mean, const at::TensorOptions& options) {
  const double square = temperature * temperature;
  if (!mean) return at::scalar_tensor(square, options.dtype(at::kDouble));
  const at::Tensor kept = slots ? slots->ge(0).sum().to(at::kDouble)
                                : at::scalar_tensor(static_cast<double>(pixels), options.dtype(at::kDouble));
  return square / kept.clamp_min(1);
}

inline void check_pixel_kd_sum_backward_inputs(const at::Tensor& grad, const at::Tensor& student,
                                               const at::Tensor& teacher, const std::optional<at::Tensor>& slots,
                                               const at::Tensor& lse_student, const at::Tensor& lse_teacher,
                                               const at::Tensor& factor, double temperature) {
  check_pixel_kd_sum_inputs(student, teacher, slots, temperature);
  check_floating(grad, "grad");
  check_size(grad, "grad", {}, "the loss's: 0-dim");
  check_same_device(grad, "grad", student, "student");
  const std::array<int64_t, 2> per_pixel{student.size(0), student.size(2)};
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse_student, "lse_student"},
                                {lse_teacher, "lse_teacher"}}) {
    check_size(t, name, per_pixel, "[outer, inner], one per vector");
    check_same_device(t, name, student, "student");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, ": expected dtype torch.float64 (_pixel_kd_sum's), got ",
                     t.scalar_type());
  }
  check_size(factor, "factor", {}, "_pixel_kd_sum's: 0-dim");
  check_same_device(factor, "factor", student, "student");
  TORCH_CHECK_TYPE(factor.scalar_type() == at::kDouble, "factor: expected dtype torch.float64 (_pixel_kd_sum's), got ",
                   factor.scalar_type());
}

}  // namespace idd_ops
