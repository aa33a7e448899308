// Autograd of idd_tail: the student sums' gradient from the distances and per-image statistics
// the forward returned (layout: csrc/common/idd_tail.h); the teacher is a constant.
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "autograd.h"

namespace idd_ops {

struct IddTail : public TraceableFunction<IddTail> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student_sums, const at::Tensor& student_counts,
                               const at::Tensor& teacher_sums, const at::Tensor& teacher_counts,
                               c10::string_view metric, bool normalize, double eps, c10::string_view reduction,
                               std::optional<at::ScalarType> dtype, std::optional<at::ScalarType> loss_dtype) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, bool, double,
        c10::string_view, std::optional<at::ScalarType>, std::optional<at::ScalarType>)>("idd_ops::idd_tail");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, dist, stats] = op.call(student_sums, student_counts, teacher_sums, teacher_counts, metric, normalize,
                                       eps, reduction, dtype, loss_dtype);
    no_zero_fills(ctx);
    ctx->save_for_backward({student_sums, student_counts, teacher_counts, dist, stats});
    ctx->saved_data["metric"] = std::string(metric);
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, dist, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                c10::string_view, bool, double, c10::string_view)>(
        "idd_ops::_idd_tail_backward");
    variable_list out(10);
    if (!wanted(ctx, grads, 0)) return out;
    const variable_list saved = ctx->get_saved_variables();
    out[0] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["metric"].toStringRef(),
                     ctx->saved_data["normalize"].toBool(), ctx->saved_data["eps"].toDouble(),
                     ctx->saved_data["reduction"].toStringRef());
    return out;
  }
};

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> idd_tail_autograd(
    const at::Tensor& student_sums, const at::Tensor& student_counts, const at::Tensor& teacher_sums,
    const at::Tensor& teacher_counts, c10::string_view metric, bool normalize, double eps, c10::string_view reduction,
    std::optional<at::ScalarType> dtype, std::optional<at::ScalarType> loss_dtype) {
  check_constant_teacher(teacher_sums, "idd_tail");
  const variable_list out = IddTail::apply(student_sums, student_counts, teacher_sums, teacher_counts, metric,
                                           normalize, eps, reduction, dtype, loss_dtype);
  return {out[0], no_grad_output(out[1]), no_grad_output(out[2])};
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("idd_tail", &idd_tail_autograd); }

}  // namespace idd_ops
