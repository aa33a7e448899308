// Pixel KD reduced in one op (_pixel_kd_sum) and its backward from ATen calls, on every device
// without a kernel of its own (the CPU; CUDA's are in csrc/cuda/softmax_kl_cuda.cu): softmax_kl's
// KL and log-sum-exps, the pixels left out masked, the KL summed in float64 and scaled once; the
// backward is softmax_kl's with the incoming gradient times the factor at the kept pixels and 0
// at the others (as the unfused route's torch.where gives them: a NaN logit at a pixel left out
// still makes its gradient NaN, 0 * NaN, as there).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/pixel_kd_sum.h"

namespace idd_ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_kd_sum_composite(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& slots, double temperature,
    bool mean) {
  check_pixel_kd_sum_inputs(student, teacher, slots, temperature);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("idd_ops::softmax_kl", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                   double)>();
  auto [kl, lse_s, lse_t] = op.call(student, teacher, temperature);
  const at::Tensor total = slots ? at::where(slots->ge(0), kl.to(at::kDouble), 0.0) : kl.to(at::kDouble);
  const at::Tensor factor = pixel_kd_sum_factor(slots, kl.numel(), temperature, mean, kl.options());
  return {(total.sum() * factor).to(kl.scalar_type()), lse_s, lse_t, factor};
}

at::Tensor pixel_kd_sum_backward_composite(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                           const std::optional<at::Tensor>& slots, const at::Tensor& lse_s,
                                           const at::Tensor& lse_t, const at::Tensor& factor, double temperature) {
  check_pixel_kd_sum_backward_inputs(grad, student, teacher, slots, lse_s, lse_t, factor, temperature);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("idd_ops::_softmax_kl_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, double)>();
  const at::Tensor g = (grad.to(at::kDouble) * factor).to(acc_dtype(student.scalar_type()));
  const at::Tensor per_pixel = slots ? at::where(slots->ge(0), g, 0.0) : g.expand({student.size(0), student.size(2)});
  return op.call(per_pixel, student, teacher, lse_s, lse_t, temperature);
}

}  // namespace

// One ATen formulation for every device that has no kernel of its own.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("_pixel_kd_sum", &pixel_kd_sum_composite);
  m.impl("_pixel_kd_sum_backward", &pixel_kd_sum_backward_composite);
}

}  // namespace idd_ops
