// IFVD's two maps (_ifvd_maps) from ATen calls and the slot-map cosine op, on every device without
// a kernel of its own (the CPU; CUDA's is csrc/cuda/ifvd_maps_cuda.cu): each network's centroids
// divided from its float64 sums into its accumulation dtype, then one _pixel_centroid_cosine_slots
// call per network, the student's with the counts, as IFVD's Python path does without this op.
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

}  // namespace

// One ATen formulation for every device that has no kernel of its own.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("_ifvd_maps", &ifvd_maps_composite);
}

}  // namespace idd_ops
