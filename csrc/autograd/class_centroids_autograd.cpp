// Autograd of class_centroids: the backward re-reads the labels (never stored resized) and
// divides by the counts the forward returned.
#include <torch/library.h>

#include <tuple>

#include "autograd.h"

namespace idd_ops {

struct ClassCentroids : public TraceableFunction<ClassCentroids> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& feats, const at::Tensor& labels,
                               int64_t num_classes, int64_t ignore_index) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                        int64_t)>("idd_ops::class_centroids");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [centroids, counts] = op.call(feats, labels, num_classes, ignore_index);
    no_zero_fills(ctx);
    ctx->save_for_backward({labels, counts});
    ctx->saved_data["height"] = feats.sym_size(2);
    ctx->saved_data["width"] = feats.sym_size(3);
    ctx->saved_data["dtype"] = feats.scalar_type();
    ctx->saved_data["ignore_index"] = ignore_index;
    return {centroids, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                                                c10::SymInt, at::ScalarType, int64_t)>("idd_ops::_class_centroids_backward");
    at::Tensor grad_feats;
    if (wanted(ctx, grads, 0)) {
      const variable_list saved = ctx->get_saved_variables();
      grad_feats = op.call(grads[0], saved[0], saved[1], ctx->saved_data["height"].toSymInt(),
                           ctx->saved_data["width"].toSymInt(), ctx->saved_data["dtype"].toScalarType(),
                           ctx->saved_data["ignore_index"].toInt());
    }
    return {grad_feats, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

std::tuple<at::Tensor, at::Tensor> class_centroids_autograd(const at::Tensor& feats, const at::Tensor& labels,
                                                            int64_t num_classes, int64_t ignore_index) {
  const variable_list out = ClassCentroids::apply(feats, labels, num_classes, ignore_index);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("class_centroids", &class_centroids_autograd); }

}  // namespace idd_ops
