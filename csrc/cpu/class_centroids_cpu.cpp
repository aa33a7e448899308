// Per-image class centroids of a feature map, forward and backward, on the CPU.
// float32 features go through the chunk kernels (label_chunks.h), 8 feature rows at a time;
// the other dtypes through the per-row run kernels (label_runs.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "class_rows.h"

namespace idd_ops {
namespace {
// declarations, not a using-directive: the file is compiled in one unit with its group
using class_rows::centroids_by_chunks;
using class_rows::centroids_by_runs;
using class_rows::count_pixels;
using class_rows::grad_by_chunks;
using class_rows::grad_by_runs;

std::tuple<at::Tensor, at::Tensor> class_centroids_kernel(const at::Tensor& feats_in, const at::Tensor& labels,
                                                          int64_t num_classes, int64_t ignore_index) {
  check_class_centroids_inputs(feats_in, labels, num_classes);
  // Rows are streamed in NCHW order; other layouts pay one copy (documented).
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), HW = H * W;
  const int64_t K = num_classes;
  const auto acc = acc_dtype(feats.scalar_type());
  at::Tensor centroids = at::zeros({B, K, C}, feats.options().dtype(acc));
  at::Tensor counts = at::zeros({B, K}, feats.options().dtype(at::kLong));
  if (B == 0) return {centroids, counts};
  int64_t* cnt = counts.data_ptr<int64_t>();

  if (feats.scalar_type() == at::kFloat) {
    const auto chunks = label_chunks_per_image(labels, H, W, K, ignore_index);
    count_pixels(chunks, K, cnt);
    if (C > 0 && HW > 0)
      centroids_by_chunks(feats.const_data_ptr<float>(), chunks, cnt, true, C, HW, K, centroids.data_ptr<float>());
    return {centroids, counts};
  }
  const auto runs = label_runs_per_image(labels, H, W, K, ignore_index);
  count_pixels(runs, K, cnt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_centroids_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    centroids_by_runs<scalar_t, acc_t>(feats.const_data_ptr<scalar_t>(), runs, cnt, true, C, HW, K,
                                     centroids.data_ptr<acc_t>());
  });
  return {centroids, counts};
}

// grad_feats[b, c, p] = grad_centroids[b, y_p, c] / counts[b, y_p], 0 where y_p is ignored.
at::Tensor class_centroids_backward_kernel(const at::Tensor& grad_centroids_in, const at::Tensor& labels,
                                           const at::Tensor& counts_in, int64_t height, int64_t width,
                                           at::ScalarType dtype, int64_t ignore_index) {
  check_class_centroids_backward_inputs(grad_centroids_in, labels, counts_in, height, width, dtype);
  const at::Tensor grad_centroids = grad_centroids_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const int64_t B = grad_centroids.size(0), K = grad_centroids.size(1), C = grad_centroids.size(2);
  const int64_t HW = height * width;
  at::Tensor grad = at::empty({B, C, height, width}, grad_centroids.options().dtype(dtype));
  if (grad.numel() == 0) return grad;
  const int64_t* cnt = counts.const_data_ptr<int64_t>();
  if (dtype == at::kFloat) {
    const auto chunks = label_chunks_per_image(labels, height, width, K, ignore_index);
    grad_by_chunks(grad_centroids.const_data_ptr<float>(), chunks, cnt, C, HW, K, grad.data_ptr<float>());
    return grad;
  }
  const auto runs = label_runs_per_image(labels, height, width, K, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_centroids_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_by_runs(grad_centroids.const_data_ptr<acc_t>(), runs, cnt, C, HW, K, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("class_centroids", &class_centroids_kernel);
  m.impl("_class_centroids_backward", &class_centroids_backward_kernel);
}

}  // namespace idd_ops
