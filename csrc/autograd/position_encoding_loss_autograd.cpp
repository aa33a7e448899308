// Autograd of position_encoding_loss: the maps are regenerated in the backward, never stored.
#include <torch/library.h>

#include <string>

#include "autograd.h"

namespace idd_ops {

struct PositionEncodingLoss : public TraceableFunction<PositionEncodingLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, at::IntArrayRef kinds,
                               at::ArrayRef<double> params, c10::string_view reduction) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, at::IntArrayRef, at::ArrayRef<double>,
                                                c10::string_view)>("idd_ops::position_encoding_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor loss = op.call(pred, kinds, params, reduction);
    ctx->save_for_backward({pred});
    ctx->saved_data["kinds"] = kinds.vec();
    ctx->saved_data["params"] = params.vec();
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                at::ArrayRef<double>, c10::string_view)>(
        "idd_ops::_position_encoding_loss_backward");
    const std::vector<int64_t> kinds = ctx->saved_data["kinds"].toIntVector();
    const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
    at::Tensor grad_pred = op.call(grads[0], ctx->get_saved_variables()[0], kinds, params,
                                   ctx->saved_data["reduction"].toStringRef());
    return {grad_pred, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

at::Tensor position_encoding_loss_autograd(const at::Tensor& pred, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                           c10::string_view reduction) {
  return PositionEncodingLoss::apply(pred, kinds, params, reduction)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("position_encoding_loss", &position_encoding_loss_autograd); }

}  // namespace idd_ops
