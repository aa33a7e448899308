// Per-image class centroids of a feature map, forward and backward, on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "kernels/class_centroids.h"
#include "label_runs.h"

namespace idd_ops {
namespace {

// Rows per parallel task: one row is H*W values, so a few rows already amortise the task.
constexpr int64_t kRowGrain = 4;

std::tuple<at::Tensor, at::Tensor> class_centroids_kernel(const at::Tensor& feats_in, const at::Tensor& labels,
                                                          int64_t num_classes, int64_t ignore_index) {
  check_class_centroids_inputs(feats_in, labels, num_classes);
  // Rows are streamed in NCHW order; other layouts pay one copy (documented).
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), HW = H * W;
  const auto acc = acc_dtype(feats.scalar_type());
  at::Tensor centroids = at::zeros({B, num_classes, C}, feats.options().dtype(acc));
  at::Tensor counts = at::zeros({B, num_classes}, feats.options().dtype(at::kLong));
  if (B == 0) return {centroids, counts};

  const auto runs = label_runs_per_image(labels, H, W, num_classes, ignore_index);
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < runs[b].size(); ++r)
      if (runs[b].cls[r] >= 0) cnt[b * num_classes + runs[b].cls[r]] += runs[b].start[r + 1] - runs[b].start[r];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_centroids_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    acc_t* out = centroids.data_ptr<acc_t>();
    const auto add_runs = IDD_CPU_KERNEL(add_run_sums<scalar_t, acc_t>);
    at::parallel_for(0, B * C, kRowGrain, [&](int64_t row0, int64_t row1) {
      std::vector<acc_t> sums(num_classes);
      for (int64_t row = row0; row < row1; ++row) {
        // (b, c) is one row of the feature map
        const int64_t b = row / C, c = row % C;
        const scalar_t* x = f + row * HW;
        const LabelRuns& rb = runs[b];
        std::fill(sums.begin(), sums.end(), acc_t(0));
        add_runs(x, rb.start.data(), rb.cls.data(), rb.size(), sums.data());
        for (int64_t k = 0; k < num_classes; ++k) {
          const int64_t n = cnt[b * num_classes + k];
          out[(b * num_classes + k) * C + c] = n > 0 ? sums[k] / static_cast<acc_t>(n) : acc_t(0);
        }
      }
    });
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
  const auto runs = label_runs_per_image(labels, height, width, K, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_centroids_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gc = grad_centroids.const_data_ptr<acc_t>();
    const int64_t* cnt = counts.const_data_ptr<int64_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, kRowGrain, [&](int64_t row0, int64_t row1) {
      std::vector<scalar_t> value(K);
      for (int64_t row = row0; row < row1; ++row) {
        const int64_t b = row / C, c = row % C;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = cnt[b * K + k];
          value[k] = static_cast<scalar_t>(n > 0 ? gc[(b * K + k) * C + c] / static_cast<acc_t>(n) : acc_t(0));
        }
        scalar_t* out = g + row * HW;
        const LabelRuns& rb = runs[b];
        for (int64_t r = 0; r < rb.size(); ++r)
          std::fill(out + rb.start[r], out + rb.start[r + 1], rb.cls[r] >= 0 ? value[rb.cls[r]] : scalar_t(0));
      }
    });
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
