#pragma once
// The autograd of a loss of a student against a constant teacher, loss(student, teacher, option)
// -> (loss, a, b), whose backward op reads both inputs and the two side outputs:
// backward(grad, student, teacher, a, b, option) -> grad_student. softmax_kl and affinity_loss
// are such ops; each names its ops and option type in a Loss struct:
//   struct Loss { static constexpr const char* kName, *kForward, *kBackward; using Option = ...; };
#include <tuple>

#include "autograd.h"

namespace idd_ops {

template <typename Loss>
struct TeacherLossFunction : public TraceableFunction<TeacherLossFunction<Loss>> {
  using Option = typename Loss::Option;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               Option option) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                    Option)>(Loss::kForward);
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, a, b] = op.call(student, teacher, option);
    no_zero_fills(ctx);
    ctx->save_for_backward({student, teacher, a, b});
    ctx->saved_data["option"] = option;
    return {loss, a, b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, Option)>(Loss::kBackward);
    at::Tensor grad_student;
    if (grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      grad_student = op.call(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["option"].template to<Option>());
    }
    return {grad_student, at::Tensor(), at::Tensor()};
  }

  // The op's Autograd kernel.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> call(const at::Tensor& student, const at::Tensor& teacher,
                                                             Option option) {
    check_constant_teacher(teacher, Loss::kName);
    const variable_list out = TeacherLossFunction::apply(student, teacher, option);
    return {out[0], no_grad_output(out[1]), no_grad_output(out[2])};
  }
};

}  // namespace idd_ops
