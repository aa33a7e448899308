// Per-image class centroids in a fixed summation order, from ATen calls: the labels are
// resized with the kernels' own index rule, every pixel's feature vector is added to its
// class row by index_put_(accumulate=True), which sorts by destination and sums each class
// in pixel order, so repeated runs agree bit for bit on every device. Slower than the fused
// kernels (one transposed copy of the features); used by the CUDA op when deterministic
// algorithms are requested, where the fused kernel's shared-memory atomics would not be.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/class_centroids_ordered.h"

namespace idd_ops {
namespace {

// Source indices [out_size] of a nearest resize in_size -> out_size, as nearest_source_index
// computes them (float scale, like F.interpolate).
at::Tensor nearest_source_indices(int64_t in_size, int64_t out_size, const at::TensorOptions& options) {
  const at::Tensor dst = at::arange(out_size, options.dtype(at::kLong));
  if (in_size == out_size) return dst;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  return (dst.to(at::kFloat) * scale).floor().to(at::kLong).clamp_max(in_size - 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> class_centroids_ordered(const at::Tensor& feats, const at::Tensor& labels,
                                                           int64_t num_classes, int64_t ignore_index) {
  check_class_centroids_inputs(feats, labels, num_classes);
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), K = num_classes;
  const auto acc = acc_dtype(feats.scalar_type());
  if (B == 0 || H * W == 0)
    return {at::zeros({B, K, C}, feats.options().dtype(acc)), at::zeros({B, K}, feats.options().dtype(at::kLong))};
  const at::Tensor y = labels.index_select(1, nearest_source_indices(labels.size(1), H, labels.options()))
                           .index_select(2, nearest_source_indices(labels.size(2), W, labels.options()))
                           .to(at::kLong);
  const at::Tensor ignored = y == ignore_index;
  const at::Tensor bad = ignored.logical_not().logical_and(y.lt(0).logical_or(y.ge(K)));
  const char* msg = "labels: a value is outside [0, num_classes) and is not ignore_index";
  if (feats.is_cpu()) {
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), msg, " (num_classes=", K, ", ignore_index=", ignore_index, ")");
  } else {  // a device-side check: no host sync
    at::_assert_async(bad.any().logical_not(), msg);
  }
  // Row of every pixel in a [B * (K + 1), C] table; row K of each image collects ignored pixels.
  const at::Tensor image = at::arange(B, y.options()).view({B, 1, 1}) * (K + 1);
  const at::Tensor row = (at::where(ignored.logical_or(bad), K, y) + image).flatten();
  const at::Tensor pixels = feats.permute({0, 2, 3, 1}).reshape({B * H * W, C}).to(acc);
  at::Tensor sums = at::zeros({B * (K + 1), C}, pixels.options());
  at::Tensor counts = at::zeros({B * (K + 1)}, y.options());
  sums.index_put_({row}, pixels, /*accumulate=*/true);
  counts.index_put_({row}, at::ones_like(row), /*accumulate=*/true);
  counts = counts.view({B, K + 1}).narrow(1, 0, K).contiguous();
  sums = sums.view({B, K + 1, C}).narrow(1, 0, K);
  return {(sums / counts.clamp_min(1).unsqueeze(2).to(acc)).contiguous(), counts};
}

// Every device runs the same ATen calls; exposed for tests and for a deterministic choice.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("_class_centroids_ordered", &class_centroids_ordered);
}

}  // namespace idd_ops
