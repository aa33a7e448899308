// Autograd of class_distance_matrix: the centroids' gradient from the saved centroids.
#include <torch/library.h>

#include <string>

#include "autograd.h"

namespace idd_ops {

struct ClassDistanceMatrix : public TraceableFunction<ClassDistanceMatrix> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& centroids, const at::Tensor& counts,
                               c10::string_view metric, bool normalize, double eps) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, bool, double)>(
        "idd_ops::class_distance_matrix");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor dist = op.call(centroids, counts, metric, normalize, eps);
    ctx->save_for_backward({centroids, counts});
    ctx->saved_data["metric"] = std::string(metric);
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["eps"] = eps;
    return {dist};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                c10::string_view, bool, double)>(
        "idd_ops::_class_distance_matrix_backward");
    at::Tensor grad_centroids;
    if (wanted(ctx, grads, 0)) {
      const variable_list saved = ctx->get_saved_variables();
      grad_centroids = op.call(grads[0], saved[0], saved[1], ctx->saved_data["metric"].toStringRef(),
                               ctx->saved_data["normalize"].toBool(), ctx->saved_data["eps"].toDouble());
    }
    return {grad_centroids, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

at::Tensor class_distance_matrix_autograd(const at::Tensor& centroids, const at::Tensor& counts,
                                          c10::string_view metric, bool normalize, double eps) {
  return ClassDistanceMatrix::apply(centroids, counts, metric, normalize, eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) { m.impl("class_distance_matrix", &class_distance_matrix_autograd); }

}  // namespace idd_ops
