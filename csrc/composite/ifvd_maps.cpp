// IFVD's two maps (_ifvd_maps) and its loss (_ifvd_loss) from ATen calls and the slot-map cosine
// op, on every device without kernels of their own (the CPU; CUDA's are csrc/cuda/ifvd_maps_cuda.cu):
// each network's centroids divided from its float64 sums into its accumulation dtype, then one
// _pixel_centroid_cosine_slots call per network, the student's with the counts, and for the loss
// mse_loss of the maps and its backward, as IFVD's Python path does without these ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/ifvd_maps.h"

namespace idd_ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ifvd_maps_composite(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_sums,
    const at::Tensor& teacher_sums, const at::Tensor& counts, const at::Tensor& slots, double eps) {
  check_ifvd_maps_inputs(student, teacher, student_sums, teacher_sums, counts, slots, eps);
  static const auto cosine =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("idd_ops::_pixel_centroid_cosine_slots", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                    const std::optional<at::Tensor>&)>();
  const auto acc = acc_dtype(student.scalar_type());
  const at::Tensor divisor = counts.clamp_min(1).unsqueeze(-1);
  // divided in float64, then rounded once to the accumulation dtype
  const at::Tensor cent_s = at::div(student_sums, divisor).to(acc), cent_t = at::div(teacher_sums, divisor).to(acc);
  auto [cos_s, fnorm_s] = cosine.call(student, cent_s, slots, eps, counts);
  at::Tensor cos_t = std::get<0>(cosine.call(teacher, cent_t, slots, eps, std::nullopt));
  return {cos_s, cos_t, fnorm_s, cent_s};
}

// The student map's backward, each device's kernel.
c10::TypedOperatorHandle<CosineSlotsBackward> cosine_slots_backward() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("idd_ops::_pixel_centroid_cosine_slots_backward", "")
                             .typed<CosineSlotsBackward>();
  return op;
}

at::Reduction::Reduction mse_reduction(bool mean) { return mean ? at::Reduction::Mean : at::Reduction::Sum; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ifvd_loss_composite(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_sums,
    const at::Tensor& teacher_sums, const at::Tensor& counts, const at::Tensor& slots, double eps, bool mean) {
  auto [cos_s, cos_t, fnorm_s, cent_s] =
      ifvd_maps_composite(student, teacher, student_sums, teacher_sums, counts, slots, eps);
  // mse_loss's mean of no pixels would be 0/0; the loss is 0 there, as every loss of the library
  const at::Tensor loss =
      cos_s.numel() == 0 ? at::zeros({}, cos_s.options()) : at::mse_loss(cos_s, cos_t, mse_reduction(mean));
  // the schema's table and norms, which CUDA's backward reads; this backward transposes the table back
  return {loss, cos_s, cos_t, fnorm_s, cent_s.transpose(1, 2).contiguous(), at::linalg_vector_norm(cent_s, 2, {-1})};
}

at::Tensor ifvd_loss_backward_composite(const at::Tensor& grad, const at::Tensor& student,
                                        const at::Tensor& student_table, const at::Tensor& student_norms,
                                        const at::Tensor& slots, const at::Tensor& cos_student,
                                        const at::Tensor& cos_teacher, const at::Tensor& feat_norms,
                                        const at::Tensor& counts, double eps, bool mean) {
  check_ifvd_loss_backward_inputs(grad, student, student_table, student_norms, slots, cos_student, cos_teacher,
                                  feat_norms, counts, eps);
  const at::Tensor grad_map =
      at::mse_loss_backward(grad.to(cos_student.scalar_type()), cos_student, cos_teacher, mse_reduction(mean));
  return std::get<0>(cosine_slots_backward().call(grad_map, student, student_table.transpose(1, 2), slots, cos_student,
                                                  feat_norms, eps, counts));
}

}  // namespace

// One ATen formulation for every device that has no kernel of its own.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("_ifvd_maps", &ifvd_maps_composite);
  m.impl("_ifvd_loss", &ifvd_loss_composite);
  m.impl("_ifvd_loss_backward", &ifvd_loss_backward_composite);
}

}  // namespace idd_ops
