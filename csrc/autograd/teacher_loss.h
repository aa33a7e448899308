#pragma once
// The autograd of a loss of a student against a constant teacher, loss(student, teacher,
// options...) -> (loss, a, b), whose backward op reads both inputs and the two side outputs:
// backward(grad, student, teacher, a, b, options...) -> grad_student. softmax_kl, affinity_loss
// and _affinity_loss_sum are such ops; each names its ops in a Loss struct and its options'
// types as the template's arguments:
//   struct Loss { static constexpr const char* kName, *kForward, *kBackward; };
#include <tuple>

#include "autograd.h"

namespace idd_ops {

template <typename Loss, typename... Options>
struct TeacherLossFunction : public TraceableFunction<TeacherLossFunction<Loss, Options...>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               Options... options) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                    Options...)>(Loss::kForward);
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, a, b] = op.call(student, teacher, options...);
    no_zero_fills(ctx);
    ctx->save_for_backward({student, teacher, a, b});
    ctx->saved_data["options"] = std::make_tuple(options...);
    return {loss, a, b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, Options...)>(Loss::kBackward);
    at::Tensor grad_student;
    if (grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      const auto options = ctx->saved_data["options"].template to<std::tuple<Options...>>();
      const auto call = [&](Options... o) { return op.call(grads[0], s[0], s[1], s[2], s[3], o...); };
      grad_student = std::apply(call, options);
    }
    variable_list grads_in(2 + sizeof...(Options));  // undefined past the student's
    grads_in[0] = grad_student;
    return grads_in;
  }

  // The op's Autograd kernel.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> call(const at::Tensor& student, const at::Tensor& teacher,
                                                             Options... options) {
    check_constant_teacher(teacher, Loss::kName);
    const variable_list out = TeacherLossFunction::apply(student, teacher, options...);
    return {out[0], no_grad_output(out[1]), no_grad_output(out[2])};
  }
};

}  // namespace idd_ops
