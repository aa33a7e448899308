// Autograd of class_sums and class_sums_pair: the gradient of a class sum reaches every pixel
// of its class (_class_sums_backward), read from the slot map the forward saved. And of the class
// means taken from those sums (_class_means): a mean's gradient reaches its class sum divided by
// the class's count (_class_means_backward).
#include <torch/library.h>

#include <tuple>

#include "autograd.h"

namespace idd_ops {

namespace {

at::Tensor sums_gradient(AutogradContext* ctx, const at::Tensor& grad_sums, const at::Tensor& slots,
                         const std::string& which) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType, bool)>(
      "idd_ops::_class_sums_backward");
  return op.call(grad_sums, slots, ctx->saved_data["dtype" + which].toScalarType(),
                 ctx->saved_data["channels_last" + which].toBool());
}

void save_feats_meta(AutogradContext* ctx, const at::Tensor& feats, const std::string& which) {
  ctx->saved_data["dtype" + which] = feats.scalar_type();
  ctx->saved_data["channels_last" + which] = channels_last_layout(feats);
}

}  // namespace

struct ClassSums : public TraceableFunction<ClassSums> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& feats, const at::Tensor& slots,
                               int64_t num_classes) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>(
        "idd_ops::class_sums");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [sums, counts] = op.call(feats, slots, num_classes);
    no_zero_fills(ctx);
    ctx->save_for_backward({slots});
    save_feats_meta(ctx, feats, "");
    return {sums, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_feats;
    if (wanted(ctx, grads, 0)) grad_feats = sums_gradient(ctx, grads[0], ctx->get_saved_variables()[0], "");
    return {grad_feats, at::Tensor(), at::Tensor()};
  }
};

// Both networks' sums in one node: a teacher passed without requires_grad still gets sums that
// require grad whenever the student's do, so callers detach them (idd_ops/_class_sums.py).
struct ClassSumsPair : public TraceableFunction<ClassSumsPair> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& feats_a, const at::Tensor& slots_a,
                               const at::Tensor& feats_b, const at::Tensor& slots_b, int64_t num_classes) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>("idd_ops::class_sums_pair");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [sums_a, counts_a, sums_b, counts_b] = op.call(feats_a, slots_a, feats_b, slots_b, num_classes);
    no_zero_fills(ctx);
    ctx->save_for_backward({slots_a, slots_b});
    save_feats_meta(ctx, feats_a, "_a");
    save_feats_meta(ctx, feats_b, "_b");
    return {sums_a, counts_a, sums_b, counts_b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list slots = ctx->get_saved_variables();
    at::Tensor grad_a, grad_b;
    if (wanted(ctx, grads, 0, 0)) grad_a = sums_gradient(ctx, grads[0], slots[0], "_a");
    if (wanted(ctx, grads, 2, 2)) grad_b = sums_gradient(ctx, grads[2], slots[1], "_b");
    return {grad_a, at::Tensor(), grad_b, at::Tensor(), at::Tensor()};
  }
};

struct ClassMeans : public TraceableFunction<ClassMeans> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& sums, const at::Tensor& counts,
                               at::ScalarType dtype) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>(
        "idd_ops::_class_means");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor means = op.call(sums, counts, dtype);
    ctx->save_for_backward({counts});
    return {means};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("idd_ops::_class_means_backward");
    at::Tensor grad_sums;
    if (wanted(ctx, grads, 0)) grad_sums = op.call(grads[0], ctx->get_saved_variables()[0]);
    return {grad_sums, at::Tensor(), at::Tensor()};
  }
};

namespace {

at::Tensor class_means_autograd(const at::Tensor& sums, const at::Tensor& counts, at::ScalarType dtype) {
  return ClassMeans::apply(sums, counts, dtype)[0];
}

std::tuple<at::Tensor, at::Tensor> class_sums_autograd(const at::Tensor& feats, const at::Tensor& slots,
                                                       int64_t num_classes) {
  const variable_list out = ClassSums::apply(feats, slots, num_classes);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_sums_pair_autograd(
    const at::Tensor& feats_a, const at::Tensor& slots_a, const at::Tensor& feats_b, const at::Tensor& slots_b,
    int64_t num_classes) {
  const variable_list out = ClassSumsPair::apply(feats_a, slots_a, feats_b, slots_b, num_classes);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) {
  m.impl("class_sums", &class_sums_autograd);
  m.impl("class_sums_pair", &class_sums_pair_autograd);
  m.impl("_class_means", &class_means_autograd);
}

}  // namespace idd_ops
