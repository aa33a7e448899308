// Autograd of idd_loss: the loss depends on D_S - D_T only, so the teacher distances' gradient
// is the negation of the student's.
#include <torch/library.h>

#include <string>

#include "autograd.h"

namespace idd_ops {

struct IddLoss : public TraceableFunction<IddLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student_dist, const at::Tensor& teacher_dist,
                               const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                               c10::string_view reduction) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, c10::string_view)>("idd_ops::idd_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor loss = op.call(student_dist, teacher_dist, student_counts, teacher_counts, reduction);
    ctx->save_for_backward({student_dist, teacher_dist, student_counts, teacher_counts});
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, c10::string_view)>(
        "idd_ops::_idd_loss_backward");
    variable_list out(5);
    if (!ctx->needs_input_grad(0) && !ctx->needs_input_grad(1)) return out;
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor grad_s = op.call(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["reduction"].toStringRef());
    if (ctx->needs_input_grad(0)) out[0] = grad_s;
    if (ctx->needs_input_grad(1)) out[1] = -grad_s.to(s[1].scalar_type());
    return out;
  }
};

namespace {

at::Tensor idd_loss_autograd(const at::Tensor& student_dist, const at::Tensor& teacher_dist,
                             const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                             c10::string_view reduction) {
  return IddLoss::apply(student_dist, teacher_dist, student_counts, teacher_counts, reduction)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("idd_loss", &idd_loss_autograd); }

}  // namespace idd_ops
