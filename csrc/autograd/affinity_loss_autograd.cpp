// Autograd of affinity_loss: the student's gradient from the C x C Grams the forward returned;
// the teacher is a constant.
#include <torch/library.h>

#include <tuple>

#include "autograd.h"

namespace idd_ops {

struct AffinityLoss : public torch::autograd::Function<AffinityLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               int64_t pool) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                    int64_t)>("idd_ops::affinity_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, gram_ss, gram_st] = op.call(student, teacher, pool);
    no_zero_fills(ctx);
    ctx->save_for_backward({student, teacher, gram_ss, gram_st});
    ctx->saved_data["pool"] = pool;
    return {loss, gram_ss, gram_st};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, int64_t)>(
        "idd_ops::_affinity_loss_backward");
    at::Tensor grad_student;
    if (grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      grad_student = op.call(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["pool"].toInt());
    }
    return {grad_student, at::Tensor(), at::Tensor()};
  }
};

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_autograd(const at::Tensor& student,
                                                                      const at::Tensor& teacher, int64_t pool) {
  check_constant_teacher(teacher, "affinity_loss");
  const variable_list out = AffinityLoss::apply(student, teacher, pool);
  return {out[0], no_grad_output(out[1]), no_grad_output(out[2])};
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("affinity_loss", &affinity_loss_autograd); }

}  // namespace idd_ops
