// Autograd of softmax_kl: one pass over student and teacher with the log-sum-exps the forward
// returned; the teacher is a constant.
#include <torch/library.h>

#include <tuple>

#include "autograd.h"

namespace idd_ops {

struct SoftmaxKL : public torch::autograd::Function<SoftmaxKL> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                    double)>("idd_ops::softmax_kl");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [kl, lse_s, lse_t] = op.call(student, teacher, temperature);
    no_zero_fills(ctx);
    ctx->save_for_backward({student, teacher, lse_s, lse_t});
    ctx->saved_data["temperature"] = temperature;
    return {kl, lse_s, lse_t};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, double)>(
        "idd_ops::_softmax_kl_backward");
    at::Tensor grad_student;
    if (grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      grad_student = op.call(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["temperature"].toDouble());
    }
    return {grad_student, at::Tensor(), at::Tensor()};
  }
};

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                                  double temperature) {
  check_constant_teacher(teacher, "softmax_kl");
  const variable_list out = SoftmaxKL::apply(student, teacher, temperature);
  return {out[0], no_grad_output(out[1]), no_grad_output(out[2])};
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("softmax_kl", &softmax_kl_autograd); }

}  // namespace idd_ops
