#pragma once
// The autograd of a loss of a student against a constant teacher, loss(student, teacher,
// options...) -> (loss, a, b), whose backward op reads both inputs and the two side outputs:
// backward(grad, student, teacher, a, b, options...) -> grad_student. softmax_kl, affinity_loss
// and _affinity_loss_sum are such ops; each names its ops in a Loss struct and its options'
// types as the template's arguments:
//   struct Loss { static constexpr const char* kName, *kForward, *kBackward; };
#include <string>
#include <tuple>
#include <utility>

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
    int i = 0;  // each option under a key of its own: compiled autograd lifts a number, not a tuple
    ((ctx->saved_data["option" + std::to_string(i++)] = options), ...);
    return {loss, a, b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, Options...)>(Loss::kBackward);
    at::Tensor grad_student;
    if (grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      grad_student = call_backward(op, ctx, grads[0], s, std::index_sequence_for<Options...>{});
    }
    variable_list grads_in(2 + sizeof...(Options));  // undefined past the student's
    grads_in[0] = grad_student;
    return grads_in;
  }

  template <typename Op, size_t... I>
  static at::Tensor call_backward(const Op& op, AutogradContext* ctx, const at::Tensor& grad, const variable_list& s,
                                  std::index_sequence<I...>) {
    return op.call(grad, s[0], s[1], s[2], s[3],
                   ctx->saved_data["option" + std::to_string(I)].template to<Options>()...);
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
