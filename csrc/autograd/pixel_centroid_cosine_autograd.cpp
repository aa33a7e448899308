// Autograd of pixel_centroid_cosine, its slot-map form, IFVD's two maps (_ifvd_maps) and its loss
// (_ifvd_loss): the gradients of the features and the centroids in one backward pass, from the
// cosines and feature norms the forward returned.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "autograd.h"

namespace idd_ops {

namespace {

// The backward's two gradients, each where its input wants one.
variable_list cosine_grads(AutogradContext* ctx, const std::tuple<at::Tensor, at::Tensor>& grads, size_t inputs) {
  variable_list out(inputs);
  if (ctx->needs_input_grad(0)) out[0] = std::get<0>(grads);
  if (ctx->needs_input_grad(1)) out[1] = std::get<1>(grads);
  return out;
}

}  // namespace

struct PixelCentroidCosine : public TraceableFunction<PixelCentroidCosine> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& feats, const at::Tensor& centroids,
                               const at::Tensor& labels, int64_t ignore_index, double eps) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, int64_t, double)>(
        "idd_ops::pixel_centroid_cosine");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [cos, norms] = op.call(feats, centroids, labels, ignore_index, eps);
    no_zero_fills(ctx);
    ctx->save_for_backward({feats, centroids, labels, cos, norms});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["eps"] = eps;
    return {cos, norms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t, double)>("idd_ops::_pixel_centroid_cosine_backward");
    if (!grads[0].defined()) return variable_list(5);
    const variable_list s = ctx->get_saved_variables();
    return cosine_grads(ctx, op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["ignore_index"].toInt(),
                                     ctx->saved_data["eps"].toDouble()), 5);
  }
};

// With counts the centroids are feats' own class means (detached by the caller), and the
// backward's feature gradient carries the path through them as well.
struct PixelCentroidCosineSlots : public TraceableFunction<PixelCentroidCosineSlots> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& feats, const at::Tensor& centroids,
                               const at::Tensor& slots, double eps, const std::optional<at::Tensor>& counts) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&)>(
        "idd_ops::_pixel_centroid_cosine_slots");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [cos, norms] = op.call(feats, centroids, slots, eps, counts);
    no_zero_fills(ctx);
    ctx->save_for_backward({feats, centroids, slots, cos, norms, counts.value_or(at::Tensor())});
    ctx->saved_data["eps"] = eps;
    return {cos, norms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, double, const std::optional<at::Tensor>&)>("idd_ops::_pixel_centroid_cosine_slots_backward");
    if (!grads[0].defined()) return variable_list(5);
    const variable_list s = ctx->get_saved_variables();
    const std::optional<at::Tensor> counts = s[5].defined() ? std::optional<at::Tensor>(s[5]) : std::nullopt;
    return cosine_grads(ctx, op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["eps"].toDouble(), counts),
                        5);
  }
};

// IFVD's two maps: the gradient reaches the student alone (the teacher and the class sums are
// constants), through its map's backward with counts, from the centroids the forward returned.
struct IfvdMaps : public TraceableFunction<IfvdMaps> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& student_sums, const at::Tensor& teacher_sums, const at::Tensor& counts,
                               const at::Tensor& slots, double eps) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, double)>("idd_ops::_ifvd_maps");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [cos_s, cos_t, fnorm_s, cent_s] = op.call(student, teacher, student_sums, teacher_sums, counts, slots, eps);
    no_zero_fills(ctx);
    ctx->save_for_backward({student, cent_s, slots, cos_s, fnorm_s, counts});
    ctx->saved_data["eps"] = eps;
    return {cos_s, cos_t, fnorm_s, cent_s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, double, const std::optional<at::Tensor>&)>("idd_ops::_pixel_centroid_cosine_slots_backward");
    variable_list out(7);
    if (!wanted(ctx, grads, 0)) return out;
    const variable_list s = ctx->get_saved_variables();
    out[0] = std::get<0>(op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["eps"].toDouble(), s[5]));
    return out;
  }
};

// IFVD's loss: as its maps, the gradient reaching the student alone; the backward forms the
// loss's gradient map from both saved maps and runs the student map's backward on it.
struct IfvdLoss : public TraceableFunction<IfvdLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& student_sums, const at::Tensor& teacher_sums, const at::Tensor& counts,
                               const at::Tensor& slots, double eps, bool mean) {
    static const auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, double, bool)>("idd_ops::_ifvd_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, cos_s, cos_t, fnorm_s, table_s, norms_s] =
        op.call(student, teacher, student_sums, teacher_sums, counts, slots, eps, mean);
    no_zero_fills(ctx);
    ctx->save_for_backward({student, table_s, norms_s, slots, cos_s, cos_t, fnorm_s, counts});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["mean"] = mean;
    return {loss, cos_s, cos_t, fnorm_s, table_s, norms_s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                bool)>("idd_ops::_ifvd_loss_backward");
    variable_list out(8);
    if (!wanted(ctx, grads, 0)) return out;
    const variable_list s = ctx->get_saved_variables();
    out[0] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], ctx->saved_data["eps"].toDouble(),
                     ctx->saved_data["mean"].toBool());
    return out;
  }
};

namespace {

// The checks of IFVD's constants (the teacher, both networks' sums) under grad mode.
void check_ifvd_constants(const at::Tensor& teacher, const at::Tensor& student_sums, const at::Tensor& teacher_sums,
                          const char* op) {
  check_constant_teacher(teacher, op);
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && (student_sums.requires_grad() || teacher_sums.requires_grad())),
                    "student_sums, teacher_sums: constants of IFVD's maps (the student's gradient through its "
                    "centroids is taken inside the op); pass them detached");
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_autograd(const at::Tensor& feats, const at::Tensor& centroids,
                                                                  const at::Tensor& labels, int64_t ignore_index,
                                                                  double eps) {
  const variable_list out = PixelCentroidCosine::apply(feats, centroids, labels, ignore_index, eps);
  return {out[0], no_grad_output(out[1])};
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_autograd(const at::Tensor& feats,
                                                                        const at::Tensor& centroids,
                                                                        const at::Tensor& slots, double eps,
                                                                        const std::optional<at::Tensor>& counts) {
  // checked with grad mode on, as the teacher checks (autograd.h)
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && counts.has_value() && centroids.requires_grad()),
                    "centroids: with counts they are feats' own class means, whose gradient reaches feats inside the "
                    "op; pass them detached");
  const variable_list out = PixelCentroidCosineSlots::apply(feats, centroids, slots, eps, counts);
  return {out[0], no_grad_output(out[1])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ifvd_maps_autograd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_sums,
    const at::Tensor& teacher_sums, const at::Tensor& counts, const at::Tensor& slots, double eps) {
  check_ifvd_constants(teacher, student_sums, teacher_sums, "_ifvd_maps");
  const variable_list out = IfvdMaps::apply(student, teacher, student_sums, teacher_sums, counts, slots, eps);
  return {out[0], no_grad_output(out[1]), no_grad_output(out[2]), no_grad_output(out[3])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ifvd_loss_autograd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& student_sums,
    const at::Tensor& teacher_sums, const at::Tensor& counts, const at::Tensor& slots, double eps, bool mean) {
  check_ifvd_constants(teacher, student_sums, teacher_sums, "_ifvd_loss");
  const variable_list out = IfvdLoss::apply(student, teacher, student_sums, teacher_sums, counts, slots, eps, mean);
  return {out[0], no_grad_output(out[1]), no_grad_output(out[2]), no_grad_output(out[3]), no_grad_output(out[4]),
          no_grad_output(out[5])};
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, Autograd, m) {
  m.impl("pixel_centroid_cosine", &pixel_centroid_cosine_autograd);
  m.impl("_pixel_centroid_cosine_slots", &pixel_centroid_cosine_slots_autograd);
  m.impl("_ifvd_maps", &ifvd_maps_autograd);
  m.impl("_ifvd_loss", &ifvd_loss_autograd);
}

}  // namespace idd_ops
