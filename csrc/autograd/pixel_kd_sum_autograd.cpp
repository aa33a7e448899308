// Autograd of _pixel_kd_sum: the backward is one pass over student and teacher with the forward's
// log-sum-exps, the slot map and the factor; the teacher is a constant.
#include <torch/library.h>

#include <optional>

#include "autograd.h"

namespace idd_ops {

struct PixelKDSum : public TraceableFunction<PixelKDSum> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& slots, double temperature, bool mean) {
    static const auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, bool)>(
            "idd_ops::_pixel_kd_sum");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, lse_s, lse_t, factor] = op.call(student, teacher, slots, temperature, mean);
    no_zero_fills(ctx);
    ctx->save_for_backward({student, teacher, slots.value_or(at::Tensor()), lse_s, lse_t, factor});
    ctx->saved_data["temperature"] = temperature;
    return {loss, lse_s, lse_t, factor};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, double)>("idd_ops::_pixel_kd_sum_backward");
    at::Tensor grad_student;
    if (wanted(ctx, grads, 0)) {
      const variable_list s = ctx->get_saved_variables();
      const std::optional<at::Tensor> slots = s[2].defined() ? std::optional<at::Tensor>(s[2]) : std::nullopt;
      grad_student = op.call(grads[0], s[0], s[1], slots, s[3], s[4], s[5], ctx->saved_data["temperature"].toDouble());
    }
    return {grad_student, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_kd_sum_autograd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& slots, double temperature,
    bool mean) {
  check_constant_teacher(teacher, "_pixel_kd_sum");
  const variable_list out = PixelKDSum::apply(student, teacher, slots, temperature, mean);
  return {out[0], no_grad_output(out[1]), no_grad_output(out[2]), no_grad_output(out[3])};
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("_pixel_kd_sum", &pixel_kd_sum_autograd); }

}  // namespace idd_ops
